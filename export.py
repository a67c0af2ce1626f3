"""
A run's trained policy as a Hugging Face GPT-2 directory, for transformers, a serving stack or a notebook:

    python export.py RUN_DIR OUT_DIR [--overwrite]

RUN_DIR is a train.py run folder (its latest good checkpoint, checksum-verified; LoRA adapters are merged in).
OUT_DIR gets config.json, model.safetensors and the tokenizer files: hf.py says what each one holds. OUT_DIR must
be new or empty: a folder that holds anything (a run, another export) is refused unless --overwrite is given, and
the run folder itself always is.
"""

import os
import sys

from checkpoint import load_run
from hf import export


def main(argv):
    overwrite = "--overwrite" in argv
    argv = [a for a in argv if a != "--overwrite"]
    if len(argv) != 2 or argv[0] in ("-h", "--help"):
        print(__doc__)
        sys.exit(0 if argv[:1] in (["-h"], ["--help"]) else 2)
    run_dir, out_dir = argv
    if os.path.exists(out_dir) and os.path.samefile(run_dir, out_dir):
        raise SystemExit(f"error: {out_dir} is the run folder itself: its config.json would be replaced")
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)) and not overwrite:
        there = sorted(os.listdir(out_dir)) if os.path.isdir(out_dir) else []
        raise SystemExit(f"error: {out_dir} is not an empty folder ({', '.join(there[:8]) or 'a file'}): choose "
                         f"another, or pass --overwrite to write the export's files over it")
    model, enc, cfg = load_run(run_dir)
    export(model, enc, out_dir, cfg.task, cfg.init_from if os.path.isdir(cfg.init_from) else None)
    print(f"exported {run_dir} ({model.num_params() / 1e6:.2f}M parameters, vocab {enc.n_vocab}) to {out_dir}")


if __name__ == "__main__":
    main(sys.argv[1:])
