"""Convert a GGUF model to a Hugging Face safetensors directory that vLLM 0.32 can load.

    python gguf_to_hf.py SRC_DIR FILE.gguf OUT_DIR

vLLM 0.32 has no GGUF loader: transformers (with gguf) dequantizes the weights, and the result
is saved as bfloat16 safetensors. Two fixes are needed on the way:
- save_pretrained refuses a "GGUF-quantized" model, although its weights are already
  dequantized: the quantizer marker is dropped.
- transformers drops the GGUF's add_bos_token / add_eos_token: they are set back from the GGUF
  metadata (without BOS, Gemma's output is garbage).
"""

import sys

import torch
from gguf import GGUFReader
from transformers import AutoModelForCausalLM, AutoTokenizer


def main() -> None:
    src, name, out = sys.argv[1:4]
    tok = AutoTokenizer.from_pretrained(src, gguf_file=name)
    fields = GGUFReader(f"{src}/{name}").fields
    for key in ("add_bos_token", "add_eos_token"):
        field = fields.get(f"tokenizer.ggml.{key}")
        if field is not None and field.data:
            setattr(tok, key, bool(field.parts[field.data[0]][0]))
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=torch.bfloat16)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.__dict__.pop("is_quantized", None)
    model.save_pretrained(out)
    tok.save_pretrained(out)


if __name__ == "__main__":
    main()
