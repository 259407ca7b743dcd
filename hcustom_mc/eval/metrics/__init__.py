"""The metrics, one module each. A metric is a class with

    name: str                       # the key in tables and MLflow ("face_sim", "dino_sim", ...)
    __init__(models_dir, device)    # loads its model(s) from the folder; raises common.MissingModelError
    score(sample) -> dict           # per-video values: floats, counts, and the backend / model used

and `expected_path(models_dir) -> Path` and `how_to_get: str` (the README's line that fills the folder).
"""
