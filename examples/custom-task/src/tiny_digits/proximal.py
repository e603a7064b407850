"""tiny-digits with a training loop of its own: a FedProx-style proximal term keeps
each board's model near the global one it started the round from (README: "A custom
training loop"). Run it as --task tiny_digits.proximal:ProximalDigits."""

import torch

from jetfed.errors import TrainingStopped
from jetfed.tasks import Option, TrainOutcome
from jetfed.training import make_optimizer
from tiny_digits.task import TinyDigits


class ProximalDigits(TinyDigits):
    name = "tiny-digits-prox"
    options = {**TinyDigits.options, "mu": Option("0.01", "weight of the proximal term", float)}

    def train(self, model, data, config, seed, stop=None):
        torch.manual_seed(seed)
        start = [p.detach().clone() for p in model.parameters()]
        optimizer, mu, seen, total = make_optimizer(config, model), self.option_values["mu"], 0, 0.0
        order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
        steps = [order[i:i + config.batch_size] for i in range(0, len(data), config.batch_size)]
        model.train()
        for inputs, labels in data.batches(steps[:config.max_batches or None]):
            if stop is not None and stop.is_set():
                raise TrainingStopped("nobody awaits the round")
            optimizer.zero_grad()
            drift = sum(((p - p0) ** 2).sum() for p, p0 in zip(model.parameters(), start))
            loss = self.loss(model(inputs), labels) + mu / 2 * drift
            loss.backward()
            optimizer.step()
            seen, total = seen + len(labels), total + float(loss.detach()) * len(labels)
        return TrainOutcome(model.state_dict(), seen, total / max(seen, 1), 0.0)
