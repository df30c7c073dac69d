"""The Flower ServerApp: :class:`~fedmoe.flower.FedMoEStrategy` on the run config's experiment
(docs/flower.md, Server)."""

from __future__ import annotations

import json
from pathlib import Path

from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from fedmoe.federated import initial_model, load_data, save_checkpoint, test_samples
from fedmoe.flower.records import OUT, federated_config, pinned_nodes
from fedmoe.flower.strategy import FedMoEStrategy

__all__ = ["server_app"]


def server_app() -> ServerApp:
    """A ServerApp running :class:`FedMoEStrategy` for ``federation.rounds`` rounds on the run config's
    experiment: the initial model is built as fedmoe's own loop builds it, and the global model is
    evaluated on the test set of ``[data] source`` after every round (the server loads only that dataset,
    no client's data). With ``nodes`` set in the run config only those node ids register, each as its
    listed partition (:func:`~fedmoe.flower.records.pinned_nodes`). With ``out`` set it writes
    ``OUT/result.json`` (config, node -> client map, node -> why it was not registered, per-round reports
    with ``accuracy`` and ``loss``) and ``OUT/checkpoint.pt`` (the server state,
    :meth:`fedmoe.federated.Server.state_dict`)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        config = federated_config(context.run_config)
        dataset = load_data(config)
        model, task, cost = initial_model(config, dataset)
        strategy = FedMoEStrategy(config, model, dataset.spec, task=task, cost=cost,
                                  pinned=pinned_nodes(context.run_config))
        test = test_samples(config, dataset)

        def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
            return MetricRecord(strategy.server.evaluate(test))

        result = strategy.start(grid, evaluate_fn=evaluate)
        out = context.run_config.get(OUT, "")
        if out:
            out = Path(str(out))
            rounds = [{**report, **result.evaluate_metrics_serverapp.get(i + 1, {})}
                      for i, report in enumerate(strategy.history)]
            save_checkpoint(out / "checkpoint.pt", strategy.server.state_dict())
            tmp = out / "result.json.tmp"
            tmp.write_text(json.dumps({"config": config.to_dict(), "rounds": rounds,
                                       "nodes": {str(n): c for n, c in strategy.nodes.items()},
                                       "rejected": {str(n): why for n, why in strategy.rejected.items()}},
                                      indent=1))
            tmp.replace(out / "result.json")

    return app
