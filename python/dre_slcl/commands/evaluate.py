"""``dre-slcl eval EMBEDDINGS``: linear probe on slide labels and report retrieval."""

from __future__ import annotations


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("eval", help="linear-probe accuracy/AUC and report retrieval of slide embeddings")
    p.add_argument("embeddings", metavar="EMBEDDINGS", help="slide embeddings (from `dre-slcl embed`)")
    p.add_argument("--labels", default=None, help="table with slide_id and label columns (CSV or JSONL)")
    p.add_argument("--label-column", default="label")
    p.add_argument("--reports", default=None, help="report embeddings (safetensors or .npy) for retrieval")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--output", default=None, help="write the metrics as JSON here too")
    p.set_defaults(func=run)


def run(args) -> int:
    import json
    import sys

    from dre_slcl.evaluate import evaluate, load_embeddings, write_metrics
    from dre_slcl.reports import load_report_embeddings, load_report_labels

    try:
        ids, emb = load_embeddings(args.embeddings)
        labels = load_report_labels(args.labels, args.label_column) if args.labels else None
        reports = load_report_embeddings(args.reports) if args.reports else None
        if labels is None and reports is None:
            raise ValueError("give --labels (linear probe) and/or --reports (retrieval)")
        metrics = evaluate(ids, emb, labels=labels, reports=reports, folds=args.folds)
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"dre-slcl eval: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(metrics, indent=2))
    if args.output:
        write_metrics(args.output, metrics)
    return 0
