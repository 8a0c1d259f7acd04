"""The ClientApp: Flower's quickstart shape; one added line compresses what it uploads."""

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

import fedcomp
from compressedexample.task import Net, load_data
from compressedexample.task import train as train_fn
from fedcomp.flower import compression_mod  # fedcomp:

# fedcomp: upload the top 5 % of the update's entries, with error feedback kept on this node
app = ClientApp(mods=[compression_mod(fedcomp.TopK(0.05))])


@app.train()
def train(msg: Message, context: Context):
    model = Net()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    pid, parts = context.node_config["partition-id"], context.node_config["num-partitions"]
    data, _ = load_data(pid, parts)
    cfg = context.run_config
    loss = train_fn(
        model,
        data,
        cfg["local-steps"],
        cfg["learning-rate"],
        cfg["batch-size"],
        seed=msg.content["config"]["server-round"],
    )
    content = RecordDict(
        {
            "arrays": ArrayRecord(model.state_dict()),
            "metrics": MetricRecord({"train_loss": loss, "num-examples": len(data[1])}),
        }
    )
    return Message(content=content, reply_to=msg)
