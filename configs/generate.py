"""Generate a reply to one chat prompt with the cas sampler (greedy by default).

Run from the repository root (default cached model, SmolLM2-135M-Instruct GGUF, fp32 on CPU):

  python -m launch.generate --config=configs/generate.py \
      --config.prompt="What is the capital of France?" --config.max_new_tokens=64

Presets (`arg`): "" (greedy) or "sample" (temperature 0.7, top_p 0.9):

  python -m launch.generate --config=configs/generate.py:sample --config.seed=1
"""
import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.model_path = ml_collections.FieldReference(None, field_type=str)  # None = default cached model
  c.prompt = "Write one sentence about the sea."
  c.system = ""  # an optional system message ("" = none)
  # chat | completion | auto (chat when the model's files carry a chat template, else completion,
  # e.g. a base GGUF; as config.prompt_format of self-study and evaluation: launch/generate.py)
  c.prompt_format = "auto"
  c.max_new_tokens = 64
  c.temperature = 0.0  # 0 = greedy
  c.top_p = 1.0
  c.seed = 0
  c.dtype = "float32"  # parameters and compute: float32 | bfloat16
  if arg == "sample":
    c.temperature = 0.7
    c.top_p = 0.9
  elif arg not in (None, ""):
    raise ValueError(f"configs/generate.py: unknown preset {arg!r} (known: '', 'sample')")
  return c

