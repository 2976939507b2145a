"""`python -m dig_jax.processing --out DIR [--family F] [--chat-template T]`: build the tiny tokenizer (no
downloads)."""
import argparse

from dig_jax.processing.template import CHAT_TEMPLATE_STYLES
from dig_jax.processing.tokenizer import NON_SPECIAL_ADDED_TOKENS, build_tiny_tokenizer

parser = argparse.ArgumentParser(description="Build the tiny Qwen2-style tokenizer with the real special-token ids.")
parser.add_argument("--out", required=True, help="directory to write tokenizer.json and the HF side files into")
parser.add_argument("--family", default="qwen3_vl", choices=sorted(NON_SPECIAL_ADDED_TOKENS))
parser.add_argument("--chat-template", default="instruct", choices=CHAT_TEMPLATE_STYLES,
                    help="style of the chat_template.jinja side file ('thinking': Qwen3-VL only)")
args = parser.parse_args()
print(build_tiny_tokenizer(args.out, args.family, chat_template=args.chat_template))
