"""`fashionbert`: one command, a subcommand per stage, in the order data flows:
catalog -> features -> train -> eval -> calibrate -> export -> index -> serve."""

# Over 400 lines because it holds every option of every stage with its help line, next to the
# small handler that passes them on; each handler imports its stage lazily, so `serve` and
# `--help` never load torch.

from __future__ import annotations

import argparse
import collections
import logging
import os
import sys

log = logging.getLogger("fashionbert")


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every option's help line ends with its default, where it has one."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS) and "default" not in text and action.option_strings:
            text += " (default: %(default)s)"
        return text


def port_number(value: str) -> int:
    """A TCP port, from --port or FASHIONBERT_PORT."""
    try:
        port = int(value)
    except ValueError:
        port = -1
    if not 0 < port < 65536:
        raise argparse.ArgumentTypeError(f"{value!r} is not a port number (1-65535)")
    return port


def positive_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"{value!r} is not a positive whole number")
    return n


def _add_catalog_args(p: argparse.ArgumentParser, split_default: str = "all") -> None:
    p.add_argument("--catalog", required=True,
                   help="a generic catalog directory (catalog.jsonl) or a directory holding fashiongen_256_256_*.h5")
    p.add_argument("--split", default=split_default, choices=["train", "validation", "all"], help="which part to read")
    p.add_argument("--skip-bad", action="store_true",
                   help="leave out bad rows (corrupt image, missing field, duplicate id, ...) and report them, instead of stopping")


def _open(args):
    from .catalog.readers import open_catalog

    return open_catalog(args.catalog, on_error="skip" if args.skip_bad else "raise")


def _report_problems(catalog) -> None:
    if catalog.problems.count:
        log.warning("Skipped bad rows: %s", catalog.problems.summary())


def cmd_catalog_demo(args) -> int:
    from .catalog.demo import generate

    result = generate(args.out, n=args.n, seed=args.seed, fmt=args.format, validation_share=args.validation_share,
                      workers=args.workers, overwrite=args.overwrite)
    log.info("Wrote a %s demo catalog of %d products (%d train, %d validation) to %s in %.1f s (%.0f products/s).",
             args.format, result.n, result.n - result.n_validation, result.n_validation, result.out, result.seconds,
             result.per_second)
    return 0


def cmd_catalog_check(args) -> int:
    catalog = _open(args)
    n, per_split, per_sub = 0, collections.Counter(), collections.Counter()
    products = set()
    for item in catalog.items(args.split):  # decodes every image: finds corrupt files too
        n += 1
        per_split[item.split] += 1
        per_sub[(item.category, item.subcategory)] += 1
        products.add(item.product_id)
    print(f"{catalog.source} ({catalog.format}): {n} images of {len(products)} products")
    print("  splits: " + ", ".join(f"{k} {v}" for k, v in sorted(per_split.items())))
    for (cat, sub), count in sorted(per_sub.items()):
        print(f"  {cat:<18} {sub:<18} {count:>7}")
    if catalog.problems.count:
        print(catalog.problems.summary())
        return 1
    print("  no problems found")
    return 0


def cmd_catalog_contact_sheet(args) -> int:
    from .catalog.contact_sheet import contact_sheet

    path = contact_sheet(_open(args), args.out, n=args.n, split=args.split)
    log.info("Wrote a contact sheet of %d items to %s.", args.n, path)
    return 0


def cmd_features(args) -> int:
    from .model.feature_cache import compute_features

    catalog = _open(args)
    run = compute_features(catalog, args.out, mode=args.mode, crop_size=args.crop_size, split=args.split,
                           batch_size=args.batch_size, precision=args.precision, device=args.device,
                           overwrite=args.overwrite, progress=not args.quiet)
    speed = f" at {run.images_per_second:.1f} images/s" if run.computed else ""
    log.info("Features for %d images in %s: computed %d%s, reused %d unchanged, resumed %d from an interrupted run, "
             "dropped %d no longer in the catalog.", run.total, run.path, run.computed, speed, run.reused, run.resumed,
             run.dropped)
    _report_problems(catalog)
    return 0


def cmd_train(args) -> int:
    import json

    from .model.config import TrainConfig
    from .model.train import train

    options = json.loads(open(args.config).read()) if args.config else {}
    if not isinstance(options, dict):
        raise ValueError(f"{args.config}: expected a JSON object of training options")
    for key in ("feature_mode", "patch_pool", "layers", "fusion_layers", "loss_weighting", "epochs", "rerank_steps", "max_minutes",
                "rerank_max_minutes", "batch_size", "seed", "device", "backbone", "max_train_products", "precision"):
        value = getattr(args, key)
        if value is not None:
            options[key] = value
    if args.no_mpm:
        options["tasks"] = [t for t in options.get("tasks", ("mlm", "mpm", "tia", "itc")) if t != "mpm"]
    summary = train(args.catalog, args.out, TrainConfig.from_dict(options), features_path=args.features,
                    overwrite=args.overwrite, progress=not args.quiet)
    best = (summary.get("rerank_stage") or {}).get("validation_after") or summary["best_validation"] or {}
    log.info("Validation of the saved model: two-tower R@1 %.3f, reranked R@1 %.3f; %.1f training minutes, "
             "peak memory %d MB.", best.get("two_tower_r1", 0), best.get("rerank_r1", 0), summary["training_minutes"],
             summary["peak_memory_mb"])
    return 0


def cmd_eval(args) -> int:
    from .model.evaluate import EvalConfig, evaluate, markdown

    cfg = EvalConfig(split=args.split, queries=args.queries, negatives=args.negatives, draws=args.draws,
                     gallery_queries=args.gallery_queries, recall_n=args.recall_n, rerank_k=args.rerank_k,
                     precision=args.precision, device=args.device, seed=args.seed)
    result = evaluate(args.run, args.catalog, cfg, features_path=args.features, progress=not args.quiet, out_name=args.name)
    print(markdown(result))
    return 0


def cmd_calibrate(args) -> int:
    from .model.calibrate import calibrate

    out = calibrate(args.run, args.catalog, split=args.split, features_path=args.features, rerank_k=args.rerank_k,
                    device=args.device, precision=args.precision, progress=not args.quiet)
    print(f"{args.run}: rerank weight on the cross-encoder logit {out['cross_weight']:g} "
          f"(fitted on {out['fitted_on']} captions; R@1 in a top {out['K']}: two-tower {out['R@1_two_tower']:.3f}, "
          f"reranked {out['R@1_fitted']:.3f})")
    return 0


def cmd_export(args) -> int:
    from .model.export import ExportConfig, export

    cfg = ExportConfig(catalog=args.catalog, split=args.split, select_queries=args.select_queries,
                       max_r1_loss=args.max_r1_loss, variant=args.variant, threads=args.threads)
    manifest = export(args.run, args.out, cfg, overwrite=args.overwrite, progress=not args.quiet)
    print(f"{args.out}: model {manifest['model_hash']}, default cross-encoder {manifest['default_variant']}")
    return 0


def _filters(args):
    from .index.store import Filters

    return Filters(category=args.category, subcategory=args.subcategory, gender=args.gender,
                   price_min=args.price_min, price_max=args.price_max)


def _model(args):
    from .runtime.exported import ExportedModel

    return ExportedModel(args.model, threads=args.threads)


def cmd_index_build(args) -> int:
    from .index.build import build
    from .index.vectors import IndexConfig

    cfg = IndexConfig(kind=args.kind, nlist=args.nlist, nprobe=args.nprobe, hnsw_m=args.hnsw_m,
                      ef_search=args.ef_search, patch_dtype=args.patch_dtype, batch_size=args.batch_size)
    cfg.validate()
    catalog = _open(args)
    model = _model(args)
    features = args.features
    if features is None and model.feature_identity.get("mode"):
        from .runtime.feature_store import default_features_path

        features = default_features_path(args.catalog, model.feature_identity["mode"])  # where training put them
    build(model, catalog, args.out, cfg, split=args.split, overwrite=args.overwrite, progress=not args.quiet,
          features=features, features_explicit=args.features is not None, recall=args.recall)
    _report_problems(catalog)
    return 0


def cmd_index_add(args) -> int:
    from .index.store import CatalogIndex

    model = _model(args)
    index = CatalogIndex(args.index, model_hash=model.model_hash, recall=args.recall)
    catalog = _open(args)
    items = list(catalog.items(args.split))
    added = index.add(items, model, progress=not args.quiet)
    log.info("Added %d items to %s; it now holds %d.", added, args.index, len(index))
    _report_problems(catalog)
    return 0


def cmd_index_delete(args) -> int:
    from .index.store import CatalogIndex

    index = CatalogIndex(args.index, recall=args.recall)
    missing = index.delete(args.ids)
    log.info("Deleted %d items from %s; it now holds %d.", len(args.ids) - len(missing), args.index, len(index))
    if missing:
        log.warning("Not in the index: %s", ", ".join(missing))
        return 1
    return 0


def cmd_index_info(args) -> int:
    import json

    from .index.store import CatalogIndex

    print(json.dumps(CatalogIndex(args.index, recall=args.recall).info(), indent=2))
    return 0


def cmd_index_search(args) -> int:
    from .index.search import Searcher
    from .index.store import CatalogIndex

    model = _model(args)
    index = CatalogIndex(args.index, model_hash=model.model_hash, recall=args.recall)
    if not args.text.strip():
        raise ValueError("the query text is empty")
    result = Searcher(model, index).search_text(args.text, k=args.k, candidates=args.candidates,
                                                rerank=args.rerank_k > 0, rerank_k=args.rerank_k, filters=_filters(args))
    items = index.items_by_row([r.row for r in result.results])
    for r in result.results:
        prob = f"  match {r.match_probability:.3f}" if r.match_probability is not None else ""
        print(f"{r.rank:>3}. {r.id:<12} score {r.score:7.3f}  recall {r.recall_score:.3f}{prob}  {items[r.row]['name']}")
    print("timings (ms): " + ", ".join(f"{k} {v:.1f}" for k, v in result.timings_ms.items()))
    return 0


def cmd_serve(args) -> int:
    import uvicorn

    from .service.app import create_app
    from .service.settings import Settings

    overrides = {k: v for k, v in (("model_dir", args.model), ("index_dir", args.index), ("threads", args.threads))
                 if v is not None}
    settings = Settings(**overrides)
    for what, path in (("model", settings.model_dir), ("index", settings.index_dir)):
        if not os.path.isfile(os.path.join(path, "manifest.json")):
            raise ValueError(f"no {what} at {path}: build it first (`make demo`), or set --{what} / FASHIONBERT_{what.upper()}_DIR")
    log.info("Starting the API on http://%s:%d (model %s, index %s).", args.host, args.port, settings.model_dir,
             settings.index_dir)
    # The event loop and HTTP parser the service is tested with: uvicorn would pick uvloop and
    # httptools instead wherever they are installed (Ray Serve, in the scale extra, brings them).
    uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level="warning" if args.quiet else "info",
                access_log=False, loop="asyncio", http="h11")
    return 0


def cmd_rerankers(args) -> int:
    import signal

    for what, path in (("model", args.model), ("index", args.index)):
        if not os.path.isfile(os.path.join(path, "manifest.json")):
            raise ValueError(f"no {what} at {path}: build it first (`make demo`), or set --{what}")
    import importlib.util

    if importlib.util.find_spec("ray") is None:
        raise ValueError("Ray Serve is not installed: pip install '.[scale]'")
    from .service import rerankers

    # A plain `kill` stops Ray's processes too, not only this one.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        rerankers.run(args.model, args.index, args.host, args.port, args.replicas, variant=args.variant,
                      threads=args.threads, max_batch=args.max_batch, temp_dir=args.ray_dir)
    except KeyboardInterrupt:
        log.info("Rerankers stopped.")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fashionbert", description=__doc__, formatter_class=_HelpFormatter)
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors, no progress bars")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    catalog = sub.add_parser("catalog", help="make, check and look at catalogs").add_subparsers(dest="action", required=True, metavar="ACTION")
    demo = catalog.add_parser("demo", help="render the fine-grained demo catalog")
    demo.add_argument("--out", required=True, help="the catalog directory to write")
    demo.add_argument("--n", type=int, default=6000, help="number of products")
    demo.add_argument("--seed", type=int, default=0, help="the same seed renders the same catalog")
    demo.add_argument("--format", choices=["jsonl", "fashiongen"], default="jsonl",
                      help="jsonl: the generic catalog; fashiongen: the Fashion-Gen HDF5 layout")
    demo.add_argument("--validation-share", type=float, default=0.2, help="share of products in the validation split")
    demo.add_argument("--workers", type=int, default=1, help="processes rendering in parallel (output is identical)")
    demo.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    demo.set_defaults(func=cmd_catalog_demo)

    check = catalog.add_parser("check", help="read every row and image of a catalog and report problems")
    _add_catalog_args(check)
    check.set_defaults(func=cmd_catalog_check)

    sheet = catalog.add_parser("contact-sheet", help="a PNG grid of catalog images with their captions")
    _add_catalog_args(sheet)
    sheet.add_argument("--out", required=True, help="the PNG to write")
    sheet.add_argument("--n", type=int, default=16, help="how many images")
    sheet.set_defaults(func=cmd_catalog_contact_sheet)

    feats = sub.add_parser("features", help="patch features of every catalog image, cached")
    _add_catalog_args(feats)
    feats.add_argument("--out", required=True, help="the feature file (HDF5)")
    feats.add_argument("--mode", choices=["grid", "crop", "global"], default="grid",
                       help="grid: the 8x8 cells of one CNN pass; crop: 64 crops embedded alone (the paper's); global: one vector")
    feats.add_argument("--crop-size", type=int, default=64, help="crop mode: pixels each 32x32 crop is resized to")
    feats.add_argument("--batch-size", type=int, default=32, help="images per CNN run")
    feats.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                       help="auto: fp32 through ONNX Runtime on a CPU, bf16 on a CUDA GPU that has it; "
                            "bf16: PyTorch bf16 autocast")
    feats.add_argument("--device", default="cuda" if _cuda() else "cpu", help="cpu or cuda")
    feats.add_argument("--overwrite", action="store_true", help="recompute everything, even with a cache of other settings")
    feats.set_defaults(func=cmd_features)

    tr = sub.add_parser("train", help="train FashionBERT (MLM, MPM, TIA, ITC) with the adaptive loss")
    tr.add_argument("--catalog", required=True, help="the training catalog (its train split trains, validation checks)")
    tr.add_argument("--out", required=True, help="the run directory; an interrupted run in it resumes")
    tr.add_argument("--config", help="a JSON file of training options, any field of TrainConfig (model/config.py)")
    tr.add_argument("--features", help="the feature cache (default: features/<mode>.h5 beside the catalog directory)")
    tr.add_argument("--feature-mode", dest="feature_mode", choices=["grid", "crop", "global"], help="patch features (default grid)")
    tr.add_argument("--patch-pool", dest="patch_pool", type=int, choices=[1, 2, 4, 8],
                    help="average the 8x8 grid of patch features in NxN blocks: 2 gives 16 patch tokens, 1 keeps 64 "
                         "(default 2 for grid and crop features, 1 for a global one)")
    tr.add_argument("--layers", type=int, help="keep the first N transformer layers of the backbone (default: all)")
    tr.add_argument("--fusion-layers", dest="fusion_layers", type=int,
                    help="how many final layers attend across text and patches (default 2; = layers: the paper's full model)")
    tr.add_argument("--loss-weighting", dest="loss_weighting", choices=["adaptive", "released-code", "fixed"],
                    help="adaptive: the paper's solve (default: on one step in four, weights_every); fixed: equal weights")
    tr.add_argument("--no-mpm", action="store_true", help="train without masked patch modelling (ablation)")
    tr.add_argument("--epochs", type=int, help="passes of the multitask loop over the training products (default 5)")
    tr.add_argument("--rerank-steps", dest="rerank_steps", type=int,
                    help="steps of the final rerank stage (default 400; 0 = none)")
    tr.add_argument("--max-minutes", dest="max_minutes", type=float,
                    help="cut the multitask loop after this many wall-clock minutes (default: no cap; a cut run "
                         "is weaker and depends on the machine's speed)")
    tr.add_argument("--rerank-max-minutes", dest="rerank_max_minutes", type=float,
                    help="cut the rerank stage after this many wall-clock minutes (default: no cap)")
    tr.add_argument("--batch-size", dest="batch_size", type=int, help="captions per multitask step (default 48)")
    tr.add_argument("--max-train-products", dest="max_train_products", type=int, help="train on at most this many products (default: all)")
    tr.add_argument("--backbone", help="a local Hugging Face BERT directory (default: the MiniLM package)")
    tr.add_argument("--precision", choices=["auto", "fp32", "bf16"],
                    help="auto (default): bf16 autocast where the GPU, or the CPU and PyTorch's kernels for it, have native bf16; else fp32")
    tr.add_argument("--seed", type=int, help="the same seed and thread count train the same model (default 0)")
    tr.add_argument("--device", default="cuda" if _cuda() else None, help="default: cuda when present, else cpu")
    tr.add_argument("--overwrite", action="store_true", help="start again instead of resuming")
    tr.set_defaults(func=cmd_train)

    ev = sub.add_parser("eval", help="the paper's protocol, matching accuracy and full-gallery retrieval")
    ev.add_argument("--run", required=True, help="a run directory written by `fashionbert train`")
    ev.add_argument("--catalog", required=True, help="the catalog to evaluate on")
    ev.add_argument("--split", default="validation", choices=["train", "validation"], help="which part")
    ev.add_argument("--features", help="the feature cache (default: features/<mode>.h5 beside the catalog directory)")
    ev.add_argument("--queries", type=int, default=100, help="queries per direction and draw (the paper: 1000)")
    ev.add_argument("--negatives", type=int, default=100, help="paper protocol: negatives per query")
    ev.add_argument("--draws", type=int, default=3, help="paper protocol: independent draws of queries and negatives")
    ev.add_argument("--gallery-queries", type=int, default=400, help="full gallery: captions ranked against every image of the split")
    ev.add_argument("--recall-n", type=int, default=100, help="two-tower candidates (N)")
    ev.add_argument("--rerank-k", type=int, default=20, help="candidates the cross-encoder reranks (K)")
    ev.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"], help="as for train")
    ev.add_argument("--device", default="cuda" if _cuda() else "cpu", help="cpu or cuda")
    ev.add_argument("--seed", type=int, default=0, help="seed of the draws")
    ev.add_argument("--name", help="file name for the results under RUN/eval/ (default: the split)")
    ev.set_defaults(func=cmd_eval)

    ca = sub.add_parser("calibrate", help="fit the rerank's weight on the cross-encoder on products the run never saw")
    ca.add_argument("--run", required=True, help="a run directory written by `fashionbert train`")
    ca.add_argument("--catalog", required=True, help="products the run never trained on (e.g. a demo catalog of another seed)")
    ca.add_argument("--split", default="all", choices=["train", "validation", "all"], help="which part")
    ca.add_argument("--features", help="the feature cache (default: RUN/calibration-<mode>.h5)")
    ca.add_argument("--rerank-k", dest="rerank_k", type=int, default=20, help="the rerank depth to fit for (the service's default)")
    ca.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"], help="as for train")
    ca.add_argument("--device", default="cuda" if _cuda() else "cpu", help="cpu or cuda")
    ca.set_defaults(func=cmd_calibrate)

    ex = sub.add_parser("export", help="export a trained run to ONNX (text tower, image tower, cross-encoder variants)")
    ex.add_argument("--run", required=True, help="a run directory written by `fashionbert train`")
    ex.add_argument("--out", required=True, help="the model directory to write")
    ex.add_argument("--catalog", help="real items for the parity check and the variant choice (default: the run's catalog)")
    ex.add_argument("--split", default="validation", choices=["train", "validation", "all"], help="which part of --catalog")
    ex.add_argument("--variant", default="auto", help="auto (measure and choose), fp32, optimized, int8, optimized-int8 or mixed-int8")
    ex.add_argument("--select-queries", dest="select_queries", type=int, default=200,
                    help="validation captions whose two-tower top 20 each variant reranks for the choice")
    ex.add_argument("--max-r1-loss", dest="max_r1_loss", type=float, default=1.0,
                    help="the most served R@1 points a faster variant may lose against fp32 to become the default")
    ex.add_argument("--threads", type=int, help="ONNX Runtime threads for the measurements (default: all cores)")
    ex.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    ex.set_defaults(func=cmd_export)

    ix = sub.add_parser("index", help="build, update and query the FAISS index of a catalog")
    ixs = ix.add_subparsers(dest="index_command", required=True, metavar="ACTION")

    def model_args(p):
        p.add_argument("--model", required=True, help="a model directory written by `fashionbert export`")
        p.add_argument("--threads", type=int, help="ONNX Runtime and FAISS threads (default: all cores)")

    def recall_arg(p, build=False):
        if build:
            p.add_argument("--recall", default=os.environ.get("FASHIONBERT_RECALL"),
                           help="milvus://HOST:PORT/COLLECTION: recall on that Milvus collection (replaced by this "
                                "catalog) instead of the in-process FAISS (default: FASHIONBERT_RECALL, else FAISS)")
        else:
            p.add_argument("--recall", default=os.environ.get("FASHIONBERT_RECALL"),
                           help="the Milvus address to use instead of the one the index was built with (default: "
                                "FASHIONBERT_RECALL, else the index's own)")

    def filter_args(p):
        p.add_argument("--category", help="only items of this category")
        p.add_argument("--subcategory", help="only items of this subcategory")
        p.add_argument("--gender", help="only items of this gender")
        p.add_argument("--price-min", dest="price_min", type=float, help="only items at this price or above")
        p.add_argument("--price-max", dest="price_max", type=float, help="only items at this price or below")

    b = ixs.add_parser("build", help="encode every catalog image and write INDEX_DIR atomically")
    model_args(b)
    _add_catalog_args(b)
    b.add_argument("--out", required=True, help="the index directory to write")
    b.add_argument("--kind", default="flat", choices=["flat", "ivf", "hnsw"],
                   help="flat: exact (default, fine to ~200k items); ivf: inverted lists, deletes work; hnsw: graph, rebuild-only")
    b.add_argument("--nlist", type=int, help="ivf lists (default ~4*sqrt(items))")
    b.add_argument("--nprobe", type=int, default=16, help="ivf lists searched per query")
    b.add_argument("--hnsw-m", dest="hnsw_m", type=int, default=32, help="hnsw: links per node")
    b.add_argument("--ef-search", dest="ef_search", type=int, default=128, help="hnsw: candidates kept per query")
    b.add_argument("--patch-dtype", dest="patch_dtype", default="float16", choices=["float16", "int8"],
                   help="how the stored patch states are kept (int8: half the disk)")
    b.add_argument("--batch-size", dest="batch_size", type=int, default=32, help="images per encoding run")
    b.add_argument("--features", help="the catalog's patch-feature cache: unchanged images skip the CNN "
                                      "(default: features/<mode>.h5 beside the catalog directory, if it is there)")
    b.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    recall_arg(b, build=True)
    b.set_defaults(func=cmd_index_build)

    a = ixs.add_parser("add", help="add the items of a catalog to an index (incremental, persisted)")
    model_args(a)
    _add_catalog_args(a)
    a.add_argument("--index", required=True, help="the index directory")
    recall_arg(a)
    a.set_defaults(func=cmd_index_add)

    d = ixs.add_parser("delete", help="remove items by id")
    d.add_argument("--index", required=True, help="the index directory")
    d.add_argument("ids", nargs="+", help="item ids")
    recall_arg(d)
    d.set_defaults(func=cmd_index_delete)

    i = ixs.add_parser("info", help="what an index holds")
    i.add_argument("--index", required=True, help="the index directory")
    recall_arg(i)
    i.set_defaults(func=cmd_index_info)

    q = ixs.add_parser("search", help="a text query: recall, then the cross-encoder rerank")
    model_args(q)
    q.add_argument("--index", required=True, help="the index directory")
    q.add_argument("--text", required=True, help="the query")
    q.add_argument("--k", type=int, default=10, help="results to print")
    q.add_argument("--candidates", type=int, default=100, help="two-tower candidates recalled")
    q.add_argument("--rerank-k", dest="rerank_k", type=int, default=20, help="0 = no rerank")
    filter_args(q)
    recall_arg(q)
    q.set_defaults(func=cmd_index_search)

    sv = sub.add_parser("serve", help="run the HTTP API and web page (settings: FASHIONBERT_* environment variables)")
    sv.add_argument("--host", default=os.environ.get("FASHIONBERT_HOST", "127.0.0.1"),
                    help="address to listen on (default: FASHIONBERT_HOST or 127.0.0.1)")
    sv.add_argument("--port", type=port_number, default=os.environ.get("FASHIONBERT_PORT", "8000"),
                    help="port to listen on (default: FASHIONBERT_PORT or 8000)")
    sv.add_argument("--model", help="model directory (default: FASHIONBERT_MODEL_DIR or data/model)")
    sv.add_argument("--index", help="index directory (default: FASHIONBERT_INDEX_DIR or data/index)")
    sv.add_argument("--threads", type=int, help="ONNX Runtime and FAISS threads (default: FASHIONBERT_THREADS or all cores)")
    sv.set_defaults(func=cmd_serve)

    rr = sub.add_parser("rerankers", help="cross-encoder replicas on Ray Serve, for `serve` with FASHIONBERT_RERANKERS")
    rr.add_argument("--model", default="data/model", help="model directory (the API's)")
    rr.add_argument("--index", default="data/index", help="index directory whose patch states the replicas read")
    rr.add_argument("--host", default="127.0.0.1", help="address Ray Serve's HTTP proxy listens on")
    rr.add_argument("--port", type=port_number, default="8100", help="its port")
    rr.add_argument("--replicas", type=positive_int, default=2, help="cross-encoder replicas")
    rr.add_argument("--threads", type=positive_int, default=1, help="ONNX Runtime threads per replica")
    rr.add_argument("--max-batch", type=positive_int, default=8, help="most waiting requests scored in one run")
    rr.add_argument("--variant", help="cross-encoder variant (default: the export's choice)")
    rr.add_argument("--ray-dir", help="Ray's session directory (default: Ray's, under /tmp/ray)")
    rr.set_defaults(func=cmd_rerankers)
    for sub_parser in _subparsers(parser):
        sub_parser.formatter_class = _HelpFormatter
    return parser


def _subparsers(parser: argparse.ArgumentParser):
    """Every parser below this one, depth first."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):
                yield child
                yield from _subparsers(child)


def _cuda() -> bool:
    # Checked without importing torch: the CLI starts fast and serving never needs torch.
    return os.path.exists("/proc/driver/nvidia/version")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(format="%(message)s", level=logging.WARNING if args.quiet else logging.INFO, stream=sys.stderr)
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # which SIMD build it loaded, at INFO
    try:
        return args.func(args)
    except (ValueError, OSError) as exc:
        # Bad data, bad settings, missing files: the message names what and where; a traceback
        # would only bury it. FASHIONBERT_DEBUG=1 shows it anyway.
        if os.environ.get("FASHIONBERT_DEBUG"):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished work is kept and the next run resumes from it", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
