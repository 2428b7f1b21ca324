"""`compressor` command line: parse, load config, call one stage, map known errors to exit 2.

Every user error (bad flag, config, data, model files) is one line on stderr and exit code 2.
Status goes through `logging` (stderr; -v/-q); what a command computes (evaluate's JSON) goes to
stdout. Config-taking commands accept `key=value` overrides anywhere after the command, and
`--set key=value` as an alias.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path

from compressor import __version__
from compressor.atomic import atomic_write
from compressor.errors import CompressorError

DISTILL_METHODS_HELP = ("fisher_ld, fisher_ld_static, uniform_ld, finetune, logit_kd, fitnets, attention_transfer, "
                        "minilm, pkd, tinybert, rkd, dkd, ranking_kd")

log = logging.getLogger("compressor")

DESCRIPTION = """Compress a transformer recommender and export it for serving.

  compressor run --config default --out runs/default      the whole job (bundled MovieLens data)
  compressor run --config smoke selection.keep=1           a quick run, one field overridden
  compressor evaluate runs/default/distill/student --data ml-latest-small --against ease

Steps one at a time: train-teacher, analyze, truncate, prune, distill, export, quantize;
batch scoring: recommend; synthetic data at any scale: synth. run, train-teacher and
recommend also run under torchrun.
`compressor COMMAND --help` lists a command's options. Configs: YAML files or the bundled
names (default, smoke, pretrained_llm); override any field with key=value (e.g. distill.lam=0.1).
Bad input prints one line and exits with code 2. TQDM_DISABLE=1 hides progress bars.
"""
OVERRIDE = re.compile(r"^[A-Za-z_][\w.]*=")


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (its default prints the whole usage block first)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _write_json(payload: dict, path: str | None) -> None:
    text = json.dumps(payload, indent=2)
    if path:
        atomic_write(path, text)
    print(text)


def _overrides(args: argparse.Namespace) -> list[str]:
    return [*getattr(args, "overrides", []), *getattr(args, "set_overrides", [])]


def cmd_train_teacher(args: argparse.Namespace) -> None:
    from compressor.config import load_config
    from compressor.data import prepare
    from compressor.pipeline import teacher_shape_problem
    from compressor.teacher import TeacherConfig, train_teacher

    cfg = load_config(TeacherConfig, args.config, _overrides(args))
    if problem := teacher_shape_problem(cfg):
        raise CompressorError(f"config: {problem}")
    data = prepare(args.data, args.format)
    # per-epoch checkpoints beside OUT: a killed command, run again, resumes from the last epoch
    _, summary = train_teacher(data, cfg, args.out, checkpoint_dir=f"{Path(args.out)}.checkpoint")
    best = summary["best_valid"]
    log.info(f"teacher saved to {args.out}: {summary['parameters']:,} parameters, "
          f"{summary['epochs_run']} epochs ({summary['stop_reason']}), valid NDCG@10 {best.get('ndcg@10', 0):.4f}")


def cmd_evaluate(args: argparse.Namespace) -> None:
    from compressor.compare import compare, evaluate_named
    from compressor.data import prepare
    from compressor.modeling import load_model

    if args.baseline and args.model_dir:
        raise CompressorError("give either MODEL_DIR or --baseline, not both")
    if not (args.baseline or args.model_dir):
        raise CompressorError("evaluate needs MODEL_DIR or --baseline mostpop|ease")
    # A model's own vocabulary defines the catalogue, so baselines and rivals rank the same items.
    loaded = load_model(args.model_dir) if args.model_dir else None
    data = prepare(args.data, args.format, vocab=loaded[1] if loaded else None)
    name = args.baseline or str(args.model_dir)
    result, extra = evaluate_named(name, data, args.split, loaded, progress=True)
    payload = {**result.to_json(), "model": name, "split": args.split, **extra}
    if args.against:
        payload["against"] = {}
        for rival in args.against:
            other, _ = evaluate_named(rival, data, args.split, progress=True)
            payload["against"][rival] = {m: {"other": other.metrics[m], **d} for m, d in
                                         compare(result, other, ("ndcg@10", "hr@10")).items()}
            d = payload["against"][rival]["ndcg@10"]
            log.info(f"NDCG@10 {result.metrics['ndcg@10']:.4f} vs {rival} {other.metrics['ndcg@10']:.4f}: "
                  f"difference {d['mean_diff']:+.4f}, 95% interval [{d['ci_low']:+.4f}, {d['ci_high']:+.4f}]"
                  + (" (excludes 0)" if d["excludes_zero"] else " (includes 0: not distinguishable)"))
    _write_json(payload, args.json)


def cmd_prune(args: argparse.Namespace) -> None:
    from compressor.config import load_config
    from compressor.prune import PruneConfig, prune_dir

    flags = {"heads": args.heads, "mlp": args.mlp, "hidden": args.hidden, "sparsity": args.sparsity,
             "scorer": args.scorer}
    overrides = [f"{k}={v}" for k, v in flags.items() if v is not None] + _overrides(args)
    cfg = load_config(PruneConfig, args.config, overrides)
    if not (cfg.structured or cfg.sparsity > 0):
        raise CompressorError("nothing to prune: give --heads, --mlp, --hidden or --sparsity above 0")
    out, report = prune_dir(args.model_dir, args.out, cfg, args.data)
    s = report.get("structured", {})
    log.info(f"pruned model saved to {out}: {report['params_before']:,} -> {report['params_after']:,} parameters"
          + (f", heads {s['heads']['before']} -> {s['heads']['after']}" if "heads" in s else "")
          + (f", MLP channels {s['mlp']['before']} -> {s['mlp']['after']}" if "mlp" in s else "")
          + (f", width {s['hidden']['before']} -> {s['hidden']['after']}" if "hidden" in s else "")
          + (f", sparsity {report['sparsity']['total']:.1%}" if cfg.sparsity > 0 else ""))


def _fraction(flag: str, text: str | None) -> float | None:
    """A number strictly between 0 and 1 from the command line, or a one-line CompressorError."""
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < 1:  # NaN fails too
        raise CompressorError(f"{flag} {text!r}: give a number strictly between 0 and 1")
    return value


def cmd_lowrank(args: argparse.Namespace) -> None:
    from compressor.config import load_config
    from compressor.lowrank import LowRankConfig, lowrank_dir

    ratio, energy = _fraction("--ratio", args.ratio), _fraction("--energy", args.energy)
    if (ratio is None) == (energy is None):
        raise CompressorError("give --ratio (fraction of parameters kept) or --energy, one of them")
    flags = {"ratio": ratio, "energy": energy, "scorer": args.scorer, "scope": args.scope}
    overrides = [f"{k}={v}" for k, v in flags.items() if v is not None] + _overrides(args)
    cfg = load_config(LowRankConfig, args.config, overrides)
    out, r = lowrank_dir(args.model_dir, args.out, cfg, args.data)
    log.info(f"factorized model saved to {out}: {r['params_before']:,} -> {r['params_after']:,} parameters "
          f"({r['factorized']} matrices factorized, {r['kept_dense']} kept dense; the factorized matrices keep "
          f"{r['effective_ratio']:.1%} of their parameters; {cfg.scorer} scorer)")


def cmd_quantize(args: argparse.Namespace) -> None:
    if Path(args.source).is_dir():  # an artifact: every method judged by the quality budget
        from compressor.config import load_config
        from compressor.data import prepare
        from compressor.data.vocab import ItemVocab
        from compressor.quantize_budget import QuantizeConfig, quantize_artifact

        flags = [f"methods=[{args.method}]"] if args.method != "auto" else []
        cfg = load_config(QuantizeConfig, args.config, flags + _overrides(args))
        data = prepare(args.data, args.format, vocab=ItemVocab.load(args.source))
        res = quantize_artifact(args.source, args.out, data, cfg, args.model_dir, log.info)
        if res.chosen is None:
            raise CompressorError(f"{res.refusal}; no graph written (measurements: {args.out}/quantization.md)")
        log.info(f"{res.chosen} graph saved to {res.chosen_path}: the fastest within the budget; measurements in "
                 f"{args.out}/quantization.md")
        return
    from compressor.quantize import quantize_onnx

    out = quantize_onnx(args.source, args.out, mode=args.mode, per_channel=args.per_channel,
                        block_size=args.block_size, accuracy_level=args.accuracy_level)
    before, after = Path(args.source).stat().st_size, out.stat().st_size
    log.info(f"{args.mode} model saved to {out}: {before / 2**20:.2f} MB -> {after / 2**20:.2f} MB")


def cmd_run(args: argparse.Namespace) -> None:
    from compressor.config import load_config
    from compressor.pipeline import RunConfig, run

    cfg = load_config(RunConfig, args.config, _overrides(args))
    out = Path(args.out) if args.out else Path("runs") / Path(args.config or "default").stem
    run(cfg, out, log=log.info, force=args.force.split(",") if args.force else None)
    log.info(f"done: artifacts in {out}/teacher and {out}/student, report in {out}/report.md")


def cmd_export(args: argparse.Namespace) -> None:
    from compressor.config import load_config
    from compressor.data import prepare
    from compressor.data.vocab import ItemVocab
    from compressor.export import ExportConfig, export_artifact
    from compressor.modeling import require_model_dir

    flags = [f"quantize={args.quantize}"] if args.quantize else []
    cfg = load_config(ExportConfig, args.config, flags + _overrides(args))
    data = prepare(args.data, args.format, vocab=ItemVocab.load(require_model_dir(args.model_dir)))
    res = export_artifact(args.model_dir, args.out, data, cfg)
    p = res.parity["model.onnx"]
    sizes = ", ".join(f"{n} {b / 2**20:.2f} MB" for n, b in res.manifest["onnx_files"].items())
    log.info(f"artifact written to {args.out}: {sizes}; parity on {p['n']} validation histories: "
          f"max abs diff {p['max_abs_diff']:.2e}, top-{p['k']} agreement {p['topk_agreement']:.4f}")


def cmd_analyze(args: argparse.Namespace) -> None:
    from compressor.config import load_config
    from compressor.data import prepare
    from compressor.importance import ImportanceConfig, run_importance, write_importance
    from compressor.modeling import load_model, model_max_len

    flags = [f"methods=[{args.methods}]"] if args.methods else []
    flags += [f"samples={args.samples}"] if args.samples is not None else []
    flags += [f"keep=[{args.keep}]"] if args.keep else []
    cfg = load_config(ImportanceConfig, args.config, flags + _overrides(args))
    model, vocab = load_model(args.teacher_dir)
    data = prepare(args.data, args.format, vocab=vocab)
    result = run_importance(model, data, cfg, model_max_len(model))
    path = write_importance(result, args.out)
    for name, s in result.methods.items():
        rho = result.spearman.get(name)
        overlap = " ".join(f"top-{k[2:]} overlap {v:.2f}" for k, v in ((result.overlap or {}).get(name) or {}).items())
        log.info(f"{name:16s} {s.seconds:8.2f} s  spearman vs ablation: {'-' if rho is None else f'{rho:+.3f}'}  {overlap}")
    log.info(f"importance written to {path}")


def cmd_truncate(args: argparse.Namespace) -> None:
    from compressor.data import prepare
    from compressor.importance import (
        DEFAULT_METHOD,
        ImportanceConfig,
        check_method,
        estimate,
        layer_scores,
    )
    from compressor.modeling import model_max_len
    from compressor.select import DEFAULT_STRATEGY, parse_layers
    from compressor.truncate import choose_and_truncate

    if (args.layers is None) == (args.keep is None):
        raise CompressorError("give either --layers 0,5,10 or --keep K (with --method/--strategy)")
    if args.layers is not None and (args.method or args.strategy or args.importance):
        raise CompressorError("--method/--strategy/--importance go with --keep, not --layers")
    method = check_method(args.method or DEFAULT_METHOD)
    source: dict = {}  # where the scores came from, recorded beside the choice
    read: dict = {}

    def data(vocab):  # read once, only if importance or validation needs it
        if "data" not in read:
            read["data"] = prepare(args.data, args.format, vocab=vocab)
        return read["data"]

    def scores(num_layers: int, teacher) -> list[float]:
        if args.importance:
            found = layer_scores(args.importance, method, num_layers)
            source["importance"] = str(args.importance)
        else:  # no importance file: this one method, estimated now
            cfg = ImportanceConfig(**({"samples": args.samples} if args.samples else {}))
            model, vocab = teacher()
            found = estimate(model, data(vocab), method, model_max_len(model), cfg).scores
            source["importance"] = "computed"
        source["scores"] = found
        return found

    choice = choose_and_truncate(args.teacher_dir, args.out, data, method=method, keep=args.keep,
                                 layers=None if args.layers is None else parse_layers(args.layers),
                                 strategy=args.strategy or DEFAULT_STRATEGY, scores=scores, info=source)
    for row in choice.why.get("candidates", []):
        log.info(f"  {row['layers']} ({', '.join(row['strategies'])}): validation NDCG@10 {row['valid_ndcg@10']:.4f}")
    log.info(f"student keeping teacher layers {choice.layers} saved to {args.out}")


def cmd_distill(args: argparse.Namespace) -> None:
    from pydantic import ValidationError

    from compressor.config import load_config
    from compressor.data import prepare
    from compressor.distill import DistillConfig, distill_dirs

    cfg = load_config(DistillConfig, args.config, _overrides(args))
    update = {k: v for k, v in (("method", args.method), ("importance_file", args.importance)) if v}
    try:
        cfg = DistillConfig.model_validate({**cfg.model_dump(), **update})
    except ValidationError as e:
        raise CompressorError(f"config: {e.errors()[0]['msg']}") from e
    r = distill_dirs(args.teacher, args.student, lambda vocab: prepare(args.data, args.format, vocab=vocab), cfg,
                     args.out, resume=args.resume)
    log.info(f"{cfg.method}: student saved to {r.model_dir}: {r.steps} steps ({r.stop_reason}), best valid "
          f"NDCG@10 {r.best_valid.get('ndcg@10', 0):.4f} at step {r.best_step}, {r.seconds:.0f} s")


def cmd_synth(args: argparse.Namespace) -> None:
    import time

    from compressor.config import load_config
    from compressor.data.synth import SynthConfig, synthesize

    flags = [f"{k}={v}" for k, v in (("users", args.users), ("items", args.items),
                                       ("interactions", args.interactions), ("seed", args.seed)) if v is not None]
    cfg = load_config(SynthConfig, None, flags + _overrides(args))
    start = time.perf_counter()
    s = synthesize(cfg, args.out, progress=lambda done, total: log.info(f"synth: {done:,} of {total:,} users"))
    log.info(f"{s['interactions']:,} interactions of {s['users']:,} users over {s['items']:,} items "
             f"({s['items_used']:,} used) written to {args.out} in {time.perf_counter() - start:.1f} s")


def cmd_recommend(args: argparse.Namespace) -> None:
    from compressor.artifact import load_manifest
    from compressor.recommend import check_options, recommend_all, write_item_embeddings

    check_options(args.out, args.k, args.batch_size, args.engine)  # before any data is read
    if args.items_out and not args.items_out.endswith(".parquet"):
        raise CompressorError(f"--items-out {args.items_out}: give a .parquet file name")
    ray_only = [f for f, v in (("--address", args.address), ("--actors", args.actors),
                               ("--max-restarts", args.max_restarts)) if v is not None]
    if args.engine == "ray":
        from compressor.recommend_ray import RayOptions, import_ray, recommend_ray

        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise CompressorError("--engine ray runs once, not under torchrun (Ray spreads the work itself)")
        import_ray()  # a missing extra is reported before any data is read
        options = RayOptions(address=args.address, actors=args.actors, batch_size=args.batch_size,
                             threads=args.threads, progress=not (args.quiet or os.environ.get("TQDM_DISABLE")),
                             **({"max_restarts": args.max_restarts} if args.max_restarts is not None else {}))
    elif ray_only:
        raise CompressorError(f"{', '.join(ray_only)}: only with --engine ray")
    load_manifest(args.model_dir)  # an artifact directory (`compressor export`), not a checkpoint
    data = None
    if args.data:
        from compressor.data import prepare
        from compressor.data.vocab import ItemVocab

        data = prepare(args.data, args.format, vocab=ItemVocab.load(args.model_dir))
    if args.engine == "ray":
        r = recommend_ray(args.model_dir, args.k, args.out, options, data, args.histories, args.onnx)
        log.info(f"top-{args.k} items of {r.users:,} users written to {r.path}/ ({r.parts} part(s); "
                 f"{r.actors} actor(s) x {r.threads} thread(s), {r.seconds:.1f} s)")
    else:
        r = recommend_all(args.model_dir, data, args.k, args.out, args.batch_size, args.onnx, args.threads,
                          histories=args.histories)
        part = f" (part {r.rank + 1} of {r.world_size}; every rank wrote its own)" if r.world_size > 1 else ""
        log.info(f"top-{args.k} items of {r.users:,} users written to {r.path}{part} ({r.seconds:.1f} s)")
    if args.items_out and int(os.environ.get("RANK", "0")) == 0:
        log.info(f"item embeddings written to {write_item_embeddings(args.model_dir, args.items_out)}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="compressor", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="count", default=0, help="more detail (debug messages)")
    common.add_argument("-q", "--quiet", action="store_true", help="errors and warnings only, no progress bars")

    def command(name: str, **kw) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[common], **kw)  # every command takes -v/-q

    _model_commands(command)
    _job_commands(command)
    return parser


def _config_args(p: argparse.ArgumentParser, model: str, example: str) -> None:
    """--config and key=value overrides, the same way on every command that takes a config."""
    p.add_argument("--config", help=f"YAML with {model} fields, or a bundled config name")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=f"override a config field, e.g. {example}")
    p.add_argument("--set", dest="set_overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="same as a positional KEY=VALUE")


def _data_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--data", required=required, default="ml-latest-small",
                   help="bundled name (ml-latest-small) or a folder/file of interactions")
    p.add_argument("--format", default="auto", help="auto, ml-latest, ml-100k, ml-1m or generic")


def _model_commands(command: Callable[..., argparse.ArgumentParser]) -> None:
    """train-teacher, evaluate, prune, lowrank, quantize, run (in `--help` order)."""
    p = command("train-teacher", help="train the teacher recommender")
    _data_args(p)
    p.add_argument("--out", required=True, help="model directory to write")
    _config_args(p, "TeacherConfig", "num_layers=4 train.epochs=2")
    p.set_defaults(func=cmd_train_teacher, distributed=True)

    p = command("evaluate", help="full-ranking metrics of a model directory or a baseline")
    p.add_argument("model_dir", nargs="?")
    _data_args(p)
    p.add_argument("--split", choices=["test", "valid"], default="test")
    p.add_argument("--baseline", choices=["mostpop", "ease"])
    p.add_argument("--against", action="append", metavar="BASELINE_OR_MODEL_DIR",
                   help="also compare with mostpop, ease or another model directory: paired bootstrap of "
                   "the per-user NDCG@10 and HR@10 differences (repeatable)")
    p.add_argument("--json", help="also write the metrics here")
    p.set_defaults(func=cmd_evaluate)

    p = command("prune", help="remove attention heads / MLP channels / hidden width, zero weights (unstructured)")
    p.add_argument("model_dir")
    p.add_argument("--out", required=True, help="model directory to write")
    p.add_argument("--heads", type=float, help="fraction of attention heads to remove, in [0, 1)")
    p.add_argument("--mlp", type=float, help="fraction of MLP intermediate channels to remove, in [0, 1)")
    p.add_argument("--hidden", type=float, help="fraction of the model width (hidden dimensions) to remove, in [0, 1)")
    p.add_argument("--sparsity", type=float, help="fraction of decoder weights to zero (unstructured), in [0, 1)")
    p.add_argument("--scorer", help="head/channel importance: fisher (default) or magnitude")
    p.add_argument("--data", default="ml-latest-small", help="data for Fisher scores (validation histories)")
    _config_args(p, "PruneConfig", "scope=per_layer samples=256")
    p.set_defaults(func=cmd_prune)

    p = command("lowrank", help="factorize decoder linears into two thinner ones (plain or Fisher-weighted SVD)")
    p.add_argument("model_dir")
    p.add_argument("--out", required=True, help="model directory to write")
    p.add_argument("--ratio", help="fraction of the factorized matrices' parameters kept, in (0, 1)")
    p.add_argument("--energy", help="instead of --ratio: share of the singular values' energy kept, in (0, 1)")
    p.add_argument("--scorer", help="fisher (Fisher-weighted SVD, default) or svd")
    p.add_argument("--scope", help="per_matrix (default) or global (one budget over all matrices)")
    p.add_argument("--data", default="ml-latest-small", help="data for the Fisher (validation histories)")
    _config_args(p, "LowRankConfig", "modules=[gate_proj,up_proj] samples=256")
    p.set_defaults(func=cmd_lowrank)

    p = command("quantize", help="quantize an artifact within a quality budget (or one ONNX file, unjudged)")
    p.add_argument("source", help="an artifact directory (budgeted search) or an ONNX file (--mode, no budget)")
    p.add_argument("--out", required=True, help="directory for the chosen graph and the measurements (artifact), "
                   "or the ONNX file to write")
    p.add_argument("--method", default="auto", help="artifact: one method (int8_per_tensor, int8, int8_static, "
                   "int4, fp16, fisher_mixed) or auto (every method of the config; the fastest within the budget)")
    p.add_argument("--model-dir", help="artifact: the model it was exported from (fisher_mixed; default: the "
                   "manifest's source_model_dir)")
    _data_args(p, required=False)
    p.add_argument("--mode", choices=["int8", "int4", "fp16"], default="int8", help="ONNX file: the method")
    p.add_argument("--per-tensor", dest="per_channel", action="store_false",
                   help="int8: one scale per weight tensor instead of one per output channel")
    p.add_argument("--block-size", type=int, help="ONNX file, int4: weights per scale (default: QuantizeConfig's)")
    p.add_argument("--accuracy-level", type=int, help="ONNX file, int4: MatMulNBits compute type, 4 = int8 "
                   "(default: QuantizeConfig's)")
    _config_args(p, "QuantizeConfig (artifact)", "min_topk_agreement=0.97 block_size=64")
    p.set_defaults(func=cmd_quantize)

    p = command("run", help="the whole job: teacher -> importance -> student -> distil -> export -> report")
    p.add_argument("--out", help="run directory (default runs/<config name>)")
    p.add_argument("--force", help="comma-separated stages to rerun even if up to date")
    _config_args(p, "RunConfig (configs/default.yaml shows every field)", "distill.train.epochs=2")
    p.set_defaults(func=cmd_run, distributed=True)


def _job_commands(command: Callable[..., argparse.ArgumentParser]) -> None:
    """export, analyze, truncate, recommend, distill, synth (in `--help` order)."""
    from compressor.select import DEFAULT_STRATEGY, SELECTION  # numpy only: --help stays quick

    p = command("export", help="ONNX export + parity check -> an artifact directory serving loads")
    p.add_argument("model_dir")
    p.add_argument("--out", required=True, help="artifact directory to write (replaced atomically)")
    _data_args(p, required=False)
    p.add_argument("--quantize", choices=["int8", "fp16"], help="also write model.<mode>.onnx")
    _config_args(p, "ExportConfig", "atol=1e-5 parity_users=512")
    p.set_defaults(func=cmd_export)

    p = command("analyze", help="per-layer importance of a teacher (Fisher and the other estimators)")
    p.add_argument("teacher_dir")
    _data_args(p, required=False)
    p.add_argument("--methods", help="comma-separated: fisher,gradient,attention,block_influence,angular,ablation,hybrid")
    p.add_argument("--samples", type=int, help="validation users the estimators read (default 512)")
    p.add_argument("--keep", help="layer budgets to record selections for, e.g. 4 or 2,4 (default 25%% of depth)")
    p.add_argument("--out", required=True, help="directory for importance.json and the plots")
    _config_args(p, "ImportanceConfig", "fisher.use_depth_bias=true")
    p.set_defaults(func=cmd_analyze)

    p = command("truncate", help="a student checkpoint keeping chosen teacher layers")
    p.add_argument("teacher_dir")
    p.add_argument("--out", required=True, help="model directory to write")
    p.add_argument("--layers", help="explicit teacher layers, e.g. 0,5,10,15")
    p.add_argument("--keep", type=int, help="number of layers to keep, chosen by --method and --strategy")
    p.add_argument("--method", help="importance method (default fisher)")
    p.add_argument("--strategy", help=f"{', '.join(SELECTION)} (default {DEFAULT_STRATEGY}), or validated "
                   "(the best of the others' sets on the validation split of --data)")
    p.add_argument("--importance", help="importance.json from `compressor analyze` (else computed with --data)")
    p.add_argument("--samples", type=int, help="validation users when importance is computed here")
    _data_args(p, required=False)
    p.set_defaults(func=cmd_truncate)

    p = command("recommend", help="every user's top-k through an exported artifact (ONNX Runtime) -> Parquet")
    p.add_argument("model_dir", help="artifact directory (from `compressor export` or a run's teacher/ or student/)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", help="the users of a dataset: bundled name (ml-latest-small) or a folder/file "
                        "of interactions")
    source.add_argument("--histories", help="Parquet file or directory of histories: columns user, items "
                        "(list of item ids, oldest first)")
    p.add_argument("--format", default="auto", help="format of --data: auto, ml-latest, ml-100k, ml-1m or generic")
    p.add_argument("--k", type=int, default=10, help="items per user (default 10), seen items excluded")
    p.add_argument("--out", required=True, help="local engine: Parquet file to write (under torchrun each rank "
                   "writes OUT_STEM-RRRRR-of-NNNNN.parquet beside it); ray: a new directory of Parquet parts")
    p.add_argument("--engine", default="local", choices=("local", "ray"), help="local (this process; the "
                   "default) or ray (Ray Data actors; pip install 'recsys-compressor[ray]')")
    p.add_argument("--address", help="ray: the cluster to join (auto or HOST:PORT); default: start a local Ray "
                   "with this machine's cores")
    p.add_argument("--actors", type=int, help="ray: scoring actors, each one ONNX Runtime session "
                   "(default: the cluster's CPUs)")
    p.add_argument("--max-restarts", type=int, help="ray: restarts allowed per actor that dies; its lost "
                   "blocks are retried (default 3; 0 fails the run at the first death)")
    p.add_argument("--batch-size", type=int, default=256, help="users per ONNX Runtime call (memory: "
                   "batch x catalogue x 4 bytes)")
    p.add_argument("--onnx", help="graph of the artifact to run (default: its serve_model), e.g. model.int8.onnx")
    p.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads, per actor under ray (default: "
                   "the runtime's; ray: CPUs / actors)")
    p.add_argument("--items-out", help="also write the artifact's item embeddings (item, vector[, bias]) to "
                   "this Parquet file, for an external index")
    p.set_defaults(func=cmd_recommend, distributed=True)

    p = command("distill", help="distil a teacher into a student (FISHER-LD or a baseline)")
    p.add_argument("--teacher", required=True, help="teacher model directory")
    p.add_argument("--student", required=True, help="student model directory (e.g. from `compressor truncate`)")
    _data_args(p)
    # spelled out rather than read from LOSSES so that `--help` does not import torch (tested against LOSSES)
    p.add_argument("--method", help=f"{DISTILL_METHODS_HELP} (fisher_ld by default)")
    p.add_argument("--importance", help="importance.json with Fisher scores (else estimated from the data)")
    p.add_argument("--out", required=True, help="directory for student/, train_log.jsonl, checkpoint.pt")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    _config_args(p, "DistillConfig", "lam=0.01 train.epochs=3")
    p.set_defaults(func=cmd_distill)

    p = command("synth", help="write a synthetic dataset (power-law popularity, user tastes, item transitions)")
    p.add_argument("--users", type=int, required=True, help="number of users")
    p.add_argument("--items", type=int, required=True, help="catalogue size")
    p.add_argument("--interactions", type=int, required=True, help="rows to write (at least 3 per user)")
    p.add_argument("--seed", type=int, help="random seed (default 0); same seed and sizes, same files")
    p.add_argument("--out", required=True, help="new folder for interactions.parquet and items.parquet")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="other SynthConfig fields, e.g. p_transition=0.3 popularity_exponent=1.2")
    p.set_defaults(func=cmd_synth)


def _process_group(args: argparse.Namespace) -> contextlib.AbstractContextManager:
    """Under torchrun (WORLD_SIZE > 1): its process group, for the commands that shard their work
    (the others are refused there). Alone: nothing, and no torch import for commands without it."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return contextlib.nullcontext()
    from compressor.distributed import session

    return session(args.command, getattr(args, "distributed", False))


def _setup_logging(args: argparse.Namespace) -> None:
    level = logging.WARNING if args.quiet else logging.DEBUG if args.verbose else logging.INFO
    if int(os.environ.get("RANK", "0")) > 0:  # under torchrun rank 0 reports; the others warn only
        level = max(level, logging.WARNING)
    if args.quiet:
        os.environ.setdefault("TQDM_DISABLE", "1")  # read when tqdm is first imported
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(level)
    log.propagate = False


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse stops filling a nargs="*" positional at the first option, so `key=value` after an
    # option arrives here; it is an override like the others. Anything else is a real error.
    unknown = [a for a in extra if not (OVERRIDE.match(a) and hasattr(args, "overrides"))]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    _setup_logging(args)
    try:
        with _process_group(args):
            args.func(args)
    except CompressorError as e:
        print(f"compressor {args.command}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"compressor {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
