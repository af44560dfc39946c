"""Recipes: top-to-bottom scripts a user can read in one sitting, built from the library's pieces.

* `activity`: the IMU demo (``hcx-extend demo``): SmolLM2 + an IMU modality, trained on BasicMotions;
* `sequence`: the long-stream task (``hcx-extend demo --task sequence``) with a token compressor;
* `train`: ``hcx-extend train`` on BasicMotions or JSONL data, with any strategy of the ladder.

Each uses the same pieces: `hcx_extend.runs.prepare_run_folder`, `hcx_extend.checkpoint.extend`,
`hcx_extend.training.Trainer`, `hcx_extend.evaluation`, `hcx_extend.runs.save_run`.
"""
