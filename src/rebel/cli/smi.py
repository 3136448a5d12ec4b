"""`rbln-smi`: what the virtual machine looks like, in the shape people know from nvidia-smi.

The devices are virtual, so the command reports the spec they are modelled on rather than live
telemetry; every figure comes from the spec file, and the file's path is printed so a reader can
see (and change) where a number came from. `--json` exists for scripts and capacity planners.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from ..errors import RBLNError
from ..npu.machine import MachineConfig, current_machine
from ..npu.spec import GiB, ProductSpec, builtin_products, load_spec

PROG = "rbln-smi"
VIRTUAL_NOTE = ("Virtual devices modelled by open-rbln: figures come from the spec file, "
                "timings are predicted, not measured.")

# Spec keys carry their unit in the name; this maps the suffix to the unit printed beside it.
UNITS = (("_tflops", "TFLOPS"), ("_tops", "TOPS"), ("gflops", "GFLOPS"), ("_gbps", "GB/s"),
         ("_us", "us"), ("_mib", "MiB"), ("_gib", "GiB"), ("_w", "W"))


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # usage errors and --help: return the code instead of exiting
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    try:
        return args.func(args)
    except (RBLNError, ValueError, OSError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Show the virtual RBLN NPU devices, their specs and traces.")
    parser.add_argument("--json", action="store_true", help="machine-readable output (list)")
    parser.set_defaults(func=cmd_list)
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")

    # SUPPRESS keeps a subcommand's default from overwriting a --json given before the command.
    p = sub.add_parser("list", help="the virtual devices (default)")
    p.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                   help="machine-readable output")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("spec", help="every figure of a product spec")
    p.add_argument("product", nargs="?", metavar="NAME_OR_PATH",
                   help="built-in product name or .toml path (default: the current machine's)")
    p.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                   help="machine-readable output")
    p.set_defaults(func=cmd_spec)

    p = sub.add_parser("products", help="the built-in products")
    p.set_defaults(func=cmd_products)

    p = sub.add_parser("trace", help="summarize a Perfetto trace written by the profiler")
    p.add_argument("file", metavar="FILE")
    p.set_defaults(func=cmd_trace)

    p = sub.add_parser("explain", help="what runs where in a compiled .rbln model (rbln-explain)")
    p.add_argument("file", metavar="FILE")
    p.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                   help="machine-readable output")
    p.set_defaults(func=cmd_explain)
    return parser


def _console():
    """A console on the current stdout; wide when piped so tables do not wrap in logs."""
    from rich.console import Console

    tty = sys.stdout.isatty()
    # markup off: product names and descriptions come from user files and may hold brackets.
    return Console(file=sys.stdout, markup=False, highlight=False, width=None if tty else 120)


# ---- list -----------------------------------------------------------------------------------

def cmd_list(args: argparse.Namespace) -> int:
    machine = current_machine()
    if args.json:
        print(json.dumps(_list_json(machine), indent=2))
        return 0
    from rich.table import Table

    spec = machine.spec
    console = _console()
    console.print(f"{PROG}: {machine.cards} x {spec.name} ({spec.family}, {spec.dies} "
                  f"die(s) per card), {len(machine.devices)} device(s)")
    console.print(VIRTUAL_NOTE)
    table = Table(show_lines=False)
    for title, justify in (("Device", "left"), ("Product", "left"), ("Card/Die", "center"),
                           ("FP16 TFLOPS", "right"), ("DRAM total GiB", "right"),
                           ("DRAM usable GiB", "right"), ("DRAM BW GB/s", "right"),
                           ("Spec", "left")):
        table.add_column(title, justify=justify)
    for d in _list_json(machine)["devices"]:
        table.add_row(d["device"], d["product"], f"{d['card']}/{d['die']}",
                      f"{d['fp16_tflops']:g}", f"{d['dram_total_gib']:.2f}",
                      f"{d['dram_usable_gib']:.2f}", f"{d['dram_bandwidth_gbps']:g}",
                      Path(d["spec_file"]).name)
    console.print(table)
    console.print(f"Spec file: {spec.source}", soft_wrap=True)
    return 0


def _list_json(machine: MachineConfig) -> dict:
    spec = machine.spec
    c, m = spec.die.compute, spec.die.memory
    devices = [{
        "index": d.index, "device": f"rbln:{d.index}", "product": d.name,
        "card": d.card, "die": d.die,
        "fp16_tflops": c.fp16_tflops,
        "dram_total_bytes": m.dram_bytes, "dram_usable_bytes": m.dram_usable_bytes,
        "dram_total_gib": m.dram_bytes / GiB, "dram_usable_gib": m.dram_usable_bytes / GiB,
        "dram_bandwidth_gbps": m.dram_bandwidth_gbps,
        "spec_file": spec.source,
    } for d in machine.devices]
    return {"virtual": True, "product": spec.name, "cards": machine.cards,
            "dies_per_card": spec.dies, "device_count": len(devices),
            "spec_file": spec.source, "devices": devices}


# ---- spec -----------------------------------------------------------------------------------

def cmd_spec(args: argparse.Namespace) -> int:
    spec = load_spec(args.product) if args.product else current_machine().spec
    if getattr(args, "json", False):
        print(json.dumps(dataclasses.asdict(spec), indent=2))
        return 0
    from rich.table import Table

    console = _console()
    console.print(f"{spec.name}: {spec.description}")
    console.print(f"Spec file: {spec.source}", soft_wrap=True)
    # One table, so values line up across sections; a bold row names each TOML section.
    table = Table(show_header=True)
    table.add_column("key")
    table.add_column("value", justify="right")
    table.add_column("unit")
    for section, rows in _spec_sections(spec):
        table.add_row(f"[{section}]", "", "", style="bold")
        for key, value, unit in rows:
            table.add_row(f"  {key}", value, unit)
        table.add_section()
    console.print(table)
    return 0


def _spec_sections(spec: ProductSpec) -> list[tuple[str, list[tuple[str, str, str]]]]:
    """Rows grouped as in the TOML file, plus the card totals the timing model derives."""
    top = [(k, v) for k, v in dataclasses.asdict(spec).items()
           if not isinstance(v, dict) and k not in ("source", "published_totals")]
    sections = [("product", [_row(k, v) for k, v in top])]
    for name in ("die.compute", "die.memory", "die.dma", "host_link", "host_link.pageable", "runtime", "host",
                 "links.die_to_die", "links.card_to_card", "published_totals"):
        obj = spec
        for part in name.split("."):
            obj = getattr(obj, part) if obj is not None else None
        if obj is not None:
            # sub-tables (host_link.pageable) get their own section
            sections.append((name, [_row(k, v) for k, v in dataclasses.asdict(obj).items()
                                    if not isinstance(v, dict) and k != "pageable"]))
    c, m, n = spec.die.compute, spec.die.memory, spec.dies
    sections.append((f"card totals, derived: {n} x die", [
        _row("fp16_tflops", c.fp16_tflops * n), _row("int8_tops", c.int8_tops * n),
        _row("dram_gib", m.dram_gib * n),
        ("dram_usable_gib", f"{m.dram_usable_bytes * n / GiB:.2f}", "GiB"),
        _row("dram_bandwidth_gbps", m.dram_bandwidth_gbps * n),
        _row("neural_engines", c.neural_engines * n)]))
    return sections


def _row(key: str, value) -> tuple[str, str, str]:
    if value is None:
        text = "-"
    elif isinstance(value, (list, tuple)):
        text = " x ".join(f"{v:g}" for v in value)
    elif isinstance(value, float):
        text = f"{value:g}"
    else:
        text = str(value)
    unit = next((u for suffix, u in UNITS if key.endswith(suffix)), "")
    return key, text, unit


# ---- products, trace, explain ------------------------------------------------------------------------

def cmd_products(args: argparse.Namespace) -> int:
    specs = [load_spec(name) for name in builtin_products()]
    width = max((len(s.name) for s in specs), default=0)
    for s in specs:
        print(f"{s.name:<{width}}  {s.dies} x {s.family}  {s.description}")
    return 0


def cmd_trace(args: argparse.Namespace) -> int:
    path = Path(args.file)
    if not path.is_file():
        raise OSError(f"trace file {str(path)!r} does not exist")
    try:
        from ..profiler import summarize_file
    except ImportError as e:
        raise RBLNError(f"trace summaries need rebel.profiler, which failed to import: {e}") from None
    from google.protobuf.message import Error as ProtobufError

    try:
        text = summarize_file(path)
    except ProtobufError as e:
        raise ValueError(f"{path} is not a Perfetto trace: {e}") from None
    print(text)
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    from ..runtime.explain import main as explain_main

    return explain_main([args.file, *(["--json"] if getattr(args, "json", False) else [])])


if __name__ == "__main__":
    sys.exit(main())
