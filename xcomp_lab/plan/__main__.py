"""The planner's command: predict one generate call of a model on a card, and answer the inverse questions.

    python -m xcomp_lab.plan --model llama-3-8b --card "L40S"
    python -m xcomp_lab.plan --model qwen2-vl-7b --card "RTX 4090" --quantization nf4 --batch 4 --image-size 896
    python -m xcomp_lab.plan --model ./my-model-folder --card "A100 40GB" --prompt-tokens 4096 --no-inverse
    python -m xcomp_lab.plan --model llama-3-8b --quantization int8 --int8-outliers counts.json --no-inverse
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from xcomp_lab.core.units import fmt_bytes
from xcomp_lab.memory.cards import CARDS
from xcomp_lab.plan.estimate import (
    ATTENTIONS,
    DEVICES,
    DTYPES,
    QUANTIZATIONS,
    estimate,
    resolve_model,
)
from xcomp_lab.plan.inverse import KNOBS, cheapest_recipe, largest
from xcomp_lab.plan.outliers import STATISTICS, check_int8_outliers
from xcomp_lab.plan.presets import preset_names


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m xcomp_lab.plan", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n")[1])
    p.add_argument("--model", required=True,
                   help=f"a preset ({', '.join(preset_names())}; ':tiny' for its tiny variant) or a folder with a "
                        "config.json")
    p.add_argument("--card", choices=list(CARDS), help="the GPU to fit (memory PyTorch sees on it, less the context)")
    p.add_argument("--dtype", choices=list(DTYPES), help="default: the preset's published dtype, else bf16")
    p.add_argument("--quantization", choices=QUANTIZATIONS, default="none")
    p.add_argument("--attn", choices=ATTENTIONS, default="sdpa")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt-tokens", type=int, default=512, help="tokens per prompt, an image's tokens included")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--image-size", type=int, help="VLMs: the side in px of each prompt's image (default: preset's)")
    p.add_argument("--device", choices=DEVICES, default="cuda")
    p.add_argument("--exact-decode", action="store_true", help="run every decode step in full (slower)")
    p.add_argument("--no-inverse", action="store_true", help="skip the largest-value and cheapest-recipe searches")
    p.add_argument("--int8-outliers", metavar="FRACTION|FILE", type=fraction_or_file,
                   help="INT8: the LLM.int8() outlier columns of each input, a fraction from 0 to 1 of its width or "
                        "a JSON file of counts (plan.outliers.calibrate_int8_outliers on the real model); default: "
                        "every column (an upper bound)")
    p.add_argument("--int8-statistic", choices=STATISTICS, default="largest",
                   help="with a counts file: the most columns one input held (default), or the mean per input; "
                        "each linear the file counts gets its own, the others their width's")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--max-memory", nargs="+", metavar="DEVICE=SIZE", type=max_memory_entry,
                   help="a device map, as from_pretrained(max_memory=...): e.g. 0=20GiB 1=20GiB cpu=64GiB; the plan "
                        "then gives each device's weights and peak")
    return p


def max_memory_entry(text: str) -> tuple[int | str, str]:
    """One DEVICE=SIZE of --max-memory: a GPU index or cpu/disk, and a size accelerate reads ("20GiB")."""
    device, sep, size = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"{text!r}: write DEVICE=SIZE, e.g. 0=20GiB")
    return (int(device) if device.isdigit() else device), size


def fraction_or_file(text: str) -> float | str:
    """--int8-outliers: a number (a fraction of the columns) or the path of a counts file."""
    try:
        return float(text)
    except ValueError:
        return text


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    settings = {"dtype": args.dtype, "quantization": args.quantization, "attn": args.attn, "batch": args.batch,
                    "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "image_size": args.image_size}
    try:
        if args.int8_outliers is not None:
            settings["int8_outliers"] = check_int8_outliers(args.int8_outliers, args.int8_statistic)
        source = resolve_model(args.model)
        plan = estimate(source, **settings, device=args.device, card=args.card, exact_decode=args.exact_decode,
                        max_memory=dict(args.max_memory) if args.max_memory else None)
        if args.json:
            print(json.dumps(plan.as_dict(), indent=2))
            return 0
        print(plan.table())
        print(f"predicted in {plan.seconds:.1f} s")
        if args.no_inverse or args.card is None or args.device != "cuda":
            return 0
        settings["dtype"] = plan.settings["dtype"]
        print(f"\nOn {args.card}, the other settings as above:")
        for knob in KNOBS:
            if knob == "image_size" and not source.family.is_vlm:
                continue
            answer = largest(source, knob, card=args.card, **settings)
            extra = f" (peak {fmt_bytes(answer.plan.reserved_peak_bytes)} reserved)" if answer.plan else ""
            print(f"  {answer}{extra}, {answer.estimates} estimates")
        recipe = cheapest_recipe(source, card=args.card, **{k: v for k, v in settings.items()
                                                              if k not in ("quantization", "attn")})
        print("  cheapest recipe that fits: " + (
            f"{recipe.settings['dtype']}, quantization {recipe.settings['quantization']}, {recipe.settings['attn']}"
            f" (peak {fmt_bytes(recipe.reserved_peak_bytes)} reserved)" if recipe else "none"))
    except (ValueError, TypeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
