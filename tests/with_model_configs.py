"""python tests/with_model_configs.py CONFIG_DIR MODULE ARGS...: `python -m MODULE ARGS` with the open_clip model
configs in CONFIG_DIR registered too (models that only tests use, such as a timm tower with BatchNorm)."""
import runpy
import sys

import open_clip

if __name__ == "__main__":
    open_clip.add_model_config(sys.argv[1])
    module = sys.argv[2]
    sys.argv = [module, *sys.argv[3:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
