"""The ServerApp: Flower's quickstart shape with fedcomp's FedAvg in place of Flower's."""

import json

from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from compressedexample.task import Net, load_data, test
from fedcomp.flower import FedAvg  # fedcomp: instead of flwr.serverapp.strategy.FedAvg

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    rounds = context.run_config["num-server-rounds"]
    strategy = FedAvg(fraction_train=1.0, fraction_evaluate=0.0)
    results = []

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model = Net()
        model.load_state_dict(arrays.to_torch_state_dict())
        loss, acc = test(model, load_data(0, 1)[1])
        results.append({"round": server_round, "test_loss": loss, "test_acc": acc})
        print(f"round {server_round}: test accuracy {acc:.4f}, loss {loss:.4f}", flush=True)
        return MetricRecord({"accuracy": acc, "loss": loss})

    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(Net().state_dict()),
        num_rounds=rounds,
        evaluate_fn=evaluate,
    )
    if context.run_config["out"]:
        with open(context.run_config["out"], "w") as f:
            json.dump({"rounds": results, "final_arrays": list(result.arrays.keys())}, f)
