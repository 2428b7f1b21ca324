"""`compressor` command line: parse, load config, call one stage, map known errors to exit 2."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from compressor.errors import CompressorError


def _write_json(payload: dict, path: str | None) -> None:
    text = json.dumps(payload, indent=2)
    if path:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_suffix(p.suffix + ".tmp")
        tmp.write_text(text)
        tmp.replace(p)
    print(text)


def cmd_train_teacher(args: argparse.Namespace) -> None:
    from compressor.config import load_config
    from compressor.data import prepare
    from compressor.teacher import TeacherConfig, train_teacher

    cfg = load_config(TeacherConfig, args.config, args.overrides)
    data = prepare(args.data, args.format)
    _, summary = train_teacher(data, cfg, args.out)
    best = summary["best_valid"]
    print(f"teacher saved to {args.out}: {summary['parameters']:,} parameters, "
          f"{summary['epochs_run']} epochs ({summary['stop_reason']}), valid NDCG@10 {best.get('ndcg@10', 0):.4f}")


def cmd_evaluate(args: argparse.Namespace) -> None:
    from compressor.data import prepare

    if args.baseline:
        from compressor.baselines import evaluate_baseline

        if args.model_dir:
            raise CompressorError("give either MODEL_DIR or --baseline, not both")
        data = prepare(args.data, args.format)
        result, info = evaluate_baseline(args.baseline, data, args.split)
        payload = {**result.to_json(), "model": args.baseline, "split": args.split, **({"fit": info} if info else {})}
    else:
        from compressor.evaluate import evaluate_model
        from compressor.modeling import load_model, recsys_meta

        if not args.model_dir:
            raise CompressorError("evaluate needs MODEL_DIR or --baseline mostpop|ease")
        model, vocab = load_model(args.model_dir)
        data = prepare(args.data, args.format, vocab=vocab)
        max_len = recsys_meta(model).get("max_len", 50)
        result = evaluate_model(model, data.split(args.split), max_len, progress=True)
        payload = {**result.to_json(), "model": str(args.model_dir), "split": args.split}
    _write_json(payload, args.json)


def cmd_export(args: argparse.Namespace) -> None:
    from compressor.config import load_config
    from compressor.data import prepare
    from compressor.data.vocab import ItemVocab
    from compressor.export import ExportConfig, export_artifact

    flags = [f"quantize={args.quantize}"] if args.quantize else []
    cfg = load_config(ExportConfig, args.config, flags + list(args.overrides))
    data = prepare(args.data, args.format, vocab=ItemVocab.load(args.model_dir))
    res = export_artifact(args.model_dir, args.out, data, cfg)
    p = res.parity["model.onnx"]
    sizes = ", ".join(f"{n} {b / 2**20:.2f} MB" for n, b in res.manifest["onnx_files"].items())
    print(f"artifact written to {args.out}: {sizes}; parity on {p['n']} validation histories: "
          f"max abs diff {p['max_abs_diff']:.2e}, top-{p['k']} agreement {p['topk_agreement']:.4f}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="compressor", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def data_args(p: argparse.ArgumentParser, required: bool = True) -> None:
        p.add_argument("--data", required=required, default="ml-latest-small",
                       help="bundled name (ml-latest-small) or a folder/file of interactions")
        p.add_argument("--format", default="auto", help="auto, ml-latest, ml-100k, ml-1m or generic")

    p = sub.add_parser("train-teacher", help="train the teacher recommender")
    data_args(p)
    p.add_argument("--out", required=True, help="model directory to write")
    p.add_argument("--config", help="YAML with TeacherConfig fields")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. num_layers=4 train.epochs=2")
    p.set_defaults(func=cmd_train_teacher)

    p = sub.add_parser("evaluate", help="full-ranking metrics of a model directory or a baseline")
    p.add_argument("model_dir", nargs="?")
    data_args(p)
    p.add_argument("--split", choices=["test", "valid"], default="test")
    p.add_argument("--baseline", choices=["mostpop", "ease"])
    p.add_argument("--json", help="also write the metrics here")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("export", help="ONNX export + parity check -> an artifact directory serving loads")
    p.add_argument("model_dir")
    p.add_argument("--out", required=True, help="artifact directory to write (replaced atomically)")
    data_args(p, required=False)
    p.add_argument("--quantize", choices=["int8", "fp16"], help="also write model.<mode>.onnx")
    p.add_argument("--config", help="YAML with ExportConfig fields")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. atol=1e-5 parity_users=512")
    p.set_defaults(func=cmd_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except CompressorError as e:
        print(f"compressor {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"compressor {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
