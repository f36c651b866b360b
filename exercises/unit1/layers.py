"""Part B: neural-network layers in NumPy, each with an explicit forward and backward.

Shapes: a batch of N rows of D features, ``x.shape == (N, D)``.  ``forward`` keeps what
``backward`` will need; ``backward(dout)`` takes dL/d(output) and returns dL/d(input), and stores
the parameter gradients in ``self.grads`` (overwriting, not adding: one backward per forward).
"""

from __future__ import annotations

import numpy as np

GELU_C = np.sqrt(2.0 / np.pi)


class Linear:
    """y = x @ W + b, with W of shape (d_in, d_out)."""

    def __init__(self, d_in: int, d_out: int, rng: np.random.Generator):
        bound = 1.0 / np.sqrt(d_in)
        self.params = {"W": rng.uniform(-bound, bound, (d_in, d_out)), "b": np.zeros(d_out)}
        self.grads = {name: np.zeros_like(p) for name, p in self.params.items()}

    def forward(self, x: np.ndarray) -> np.ndarray:
        # TODO: keep x for backward; return x @ W + b.
        # YOUR CODE HERE
        raise NotImplementedError("TODO: fill in Linear.forward in exercises/unit1/layers.py")

    def backward(self, dout: np.ndarray) -> np.ndarray:
        # TODO: grads["W"] = x^T dout, grads["b"] = column sums of dout; return dout W^T.
        # YOUR CODE HERE
        raise NotImplementedError("TODO: fill in Linear.backward in exercises/unit1/layers.py")


class ReLU:
    params: dict = {}
    grads: dict = {}

    def forward(self, x: np.ndarray) -> np.ndarray:
        # TODO: max(0, x), remembering where x > 0.
        # YOUR CODE HERE
        raise NotImplementedError("TODO: fill in ReLU.forward in exercises/unit1/layers.py")

    def backward(self, dout: np.ndarray) -> np.ndarray:
        # TODO: pass the gradient through where x > 0 only.
        # YOUR CODE HERE
        raise NotImplementedError("TODO: fill in ReLU.backward in exercises/unit1/layers.py")


class GELU:
    """GELU, tanh approximation: 0.5 x (1 + tanh(c (x + 0.044715 x^3))), c = sqrt(2/pi)."""

    params: dict = {}
    grads: dict = {}

    def forward(self, x: np.ndarray) -> np.ndarray:
        # TODO: the formula above; keep x and the tanh for backward.
        # YOUR CODE HERE
        raise NotImplementedError("TODO: fill in GELU.forward in exercises/unit1/layers.py")

    def backward(self, dout: np.ndarray) -> np.ndarray:
        # TODO: product rule; d tanh(u)/du = 1 - tanh(u)^2, du/dx = c (1 + 3 * 0.044715 x^2).
        # YOUR CODE HERE
        raise NotImplementedError("TODO: fill in GELU.backward in exercises/unit1/layers.py")


class LayerNorm:
    """Normalise each row to mean 0 and variance 1 (biased variance), then scale and shift."""

    def __init__(self, dim: int, eps: float = 1e-5):
        self.eps = eps
        self.params = {"gamma": np.ones(dim), "beta": np.zeros(dim)}
        self.grads = {name: np.zeros_like(p) for name, p in self.params.items()}

    def forward(self, x: np.ndarray) -> np.ndarray:
        # TODO: xhat = (x - mean) / sqrt(var + eps) over the last axis; y = gamma * xhat + beta.
        # YOUR CODE HERE
        raise NotImplementedError("TODO: fill in LayerNorm.forward in exercises/unit1/layers.py")

    def backward(self, dout: np.ndarray) -> np.ndarray:
        # TODO: grads for gamma and beta; dx = rstd * (g - mean(g) - xhat * mean(g * xhat)),
        # with g = dout * gamma and the means over the last axis.
        # YOUR CODE HERE
        raise NotImplementedError("TODO: fill in LayerNorm.backward in exercises/unit1/layers.py")


def softmax_cross_entropy(logits: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean cross-entropy of softmax(logits) against integer labels, and d(loss)/d(logits).

    Must stay finite for logits as large as +-1e4: subtract each row's maximum first.
    """
    # TODO: log-softmax via the max trick; loss = -mean(log p[label]); grad = (p - onehot) / N.
    # YOUR CODE HERE
    raise NotImplementedError("TODO: fill in softmax_cross_entropy in exercises/unit1/layers.py")


class MLP:
    """Linear -> activation -> ... -> Linear (no activation after the last layer)."""

    def __init__(self, sizes: list[int], rng: np.random.Generator, activation: str = "relu", layernorm: bool = False):
        act = {"relu": ReLU, "gelu": GELU}[activation]
        self.layers: list = []
        for i, (d_in, d_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            self.layers.append(Linear(d_in, d_out, rng))
            if i < len(sizes) - 2:
                if layernorm:
                    self.layers.append(LayerNorm(d_out))
                self.layers.append(act())

    def forward(self, x: np.ndarray) -> np.ndarray:
        for layer in self.layers:
            x = layer.forward(x)
        return x

    def backward(self, dout: np.ndarray) -> np.ndarray:
        for layer in reversed(self.layers):
            dout = layer.backward(dout)
        return dout

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.forward(x).argmax(axis=1)


class SGD:
    def __init__(self, layers: list, lr: float = 0.1):
        self.layers, self.lr = layers, lr

    def step(self) -> None:
        for layer in self.layers:
            for name, param in layer.params.items():
                param -= self.lr * layer.grads[name]


class Adam:
    """Adam with bias correction: m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2;
    p -= lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)."""

    def __init__(self, layers: list, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        self.layers, self.lr, self.betas, self.eps = layers, lr, betas, eps
        self.t = 0
        self.m = [{n: np.zeros_like(p) for n, p in layer.params.items()} for layer in layers]
        self.v = [{n: np.zeros_like(p) for n, p in layer.params.items()} for layer in layers]

    def step(self) -> None:
        # TODO: one Adam update of every parameter, in place (param -= ...).
        # YOUR CODE HERE
        raise NotImplementedError("TODO: fill in Adam.step in exercises/unit1/layers.py")


def make_spirals(n_per_class: int, n_classes: int, rng: np.random.Generator, noise: float = 0.2):
    """Interleaved spirals: points (N, 2) and integer labels (N,). Given; nothing to write."""
    xs, ys = [], []
    for c in range(n_classes):
        r = np.linspace(0.05, 1.0, n_per_class)
        theta = np.linspace(c * 4.0, (c + 1) * 4.0, n_per_class) + rng.normal(0, noise, n_per_class)
        xs.append(np.stack([r * np.sin(theta), r * np.cos(theta)], axis=1))
        ys.append(np.full(n_per_class, c))
    return np.concatenate(xs), np.concatenate(ys)


def train(model: MLP, optimizer, x: np.ndarray, y: np.ndarray, epochs: int, batch_size: int,
          rng: np.random.Generator) -> list[float]:
    """Minibatch training; returns the mean loss of each epoch.

    Each epoch: shuffle the rows with ``rng.permutation``, then for each batch: forward,
    softmax_cross_entropy, model.backward, optimizer.step.
    """
    # TODO: the loop described above.
    # YOUR CODE HERE
    raise NotImplementedError("TODO: fill in train in exercises/unit1/layers.py")


def fit_spirals(x: np.ndarray, y: np.ndarray, seed: int = 0, epochs: int = 300) -> MLP:
    """Train an MLP on the given points; given, it only wires your parts together."""
    rng = np.random.default_rng(seed)
    model = MLP([x.shape[1], 64, 64, int(y.max()) + 1], rng, activation="relu")
    train(model, Adam(model.layers, lr=1e-2), x, y, epochs=epochs, batch_size=64, rng=rng)
    return model
