"""Run llama.cpp's converter with a named BPE pre-tokenizer, for a tokenizer it does not recognise.

The converter names a BPE tokenizer's pre-tokenizer (how text is split before the merges: `llama-bpe`,
`qwen2`, ...) by hashing the token ids of a fixed text, and stops on a hash it does not know: a tokenizer
retrained or changed from its family's has a new hash though it splits text as the family does. llama.cpp's
own answer is to add the hash to the converter; the export's `--pre-tokenizer NAME` names it instead, for
that tokenizer alone, and the verification gate then checks that llama.cpp tokenizes as the model does.
A tokenizer the converter recognises keeps the name it gives.

    python -m appliance.unused convert_with_pre.py NAME CONVERTER_SCRIPT [CONVERTER ARGS...]
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path


def main(name: str, converter: Path, args: list[str]) -> None:
    folder = converter.parent
    sys.path[:0] = [str(folder), str(folder / "gguf-py")]
    from conversion.base import TextModel  # the converter's own package, which it imports in turn

    recognised = TextModel.get_vocab_base_pre

    def named(self: TextModel, tokenizer: object) -> str:
        try:
            return str(recognised(self, tokenizer))
        except NotImplementedError:
            print(f"appliance: the pre-tokenizer is not recognised by its hash; named {name!r} as asked",
                  file=sys.stderr)
            return name

    TextModel.get_vocab_base_pre = named  # type: ignore[method-assign]
    sys.argv = [str(converter), *args]
    runpy.run_path(str(converter), run_name="__main__")


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit("usage: convert_with_pre.py NAME CONVERTER_SCRIPT [ARGS...]")
    main(sys.argv[1], Path(sys.argv[2]), sys.argv[3:])
