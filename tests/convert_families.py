"""Convert several Hugging Face folders to F16 GGUF in one process with llama.cpp's converter (run by
`family_models.convert_all` as `python -m appliance.unused convert_families.py TOOLCHAIN [MODEL OUT PRE]...`).

PRE names the BPE pre-tokenizer for a tokenizer whose hash the converter does not know ("-": none), as
llama.cpp's own update script does for a new model; a tokenizer it knows keeps the name it gives."""

from __future__ import annotations

import sys
from pathlib import Path


def main(toolchain: Path, triples: list[str]) -> None:
    sys.path[:0] = [str(toolchain), str(toolchain / "gguf-py")]
    import convert_hf_to_gguf
    from conversion.base import TextModel

    known = TextModel.get_vocab_base_pre
    for model, out, pre in zip(triples[::3], triples[1::3], triples[2::3], strict=True):
        def named(self: TextModel, tokenizer: object, pre: str = pre) -> str:
            try:
                return str(known(self, tokenizer))
            except NotImplementedError:
                if pre == "-":
                    raise
                return pre

        TextModel.get_vocab_base_pre = named  # type: ignore[method-assign]
        sys.argv = ["convert_hf_to_gguf.py", model, "--outfile", out, "--outtype", "f16"]
        convert_hf_to_gguf.main()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
