"""The Nuclio function: function.yaml (CPU), function-gpu.yaml, main.py, model_handler.py."""
