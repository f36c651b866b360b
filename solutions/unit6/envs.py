"""Course code (read it, do not edit it): a vectorised gridworld, a small actor-critic, and the
PPO training loop that runs them with your functions from ppo.py.

GridWorld: an n x n grid, every episode starts in the top-left corner; the goal is the
bottom-right corner.  Actions 0..3 move up, down, left, right (a move into a wall stays put).
Reward: -0.02 per step, +1 on the step that reaches the goal (which ends the episode); an
episode also ends after ``max_steps``.  A finished environment resets at once, so one rollout
holds several episodes per environment: exactly why GAE must stop at ``dones``.
The best return on the default 5 x 5 grid is 1 - 7 * 0.02 = 0.86 (8 moves).

The loop reaches your functions through its ``ppo`` argument: by default your ppo.py, imported
when the loop first runs (this file imports none of your code).  The grader passes its own view of
your ppo.py instead: it runs this loop on its side, calls your functions one at a time, and
measures the returns here with the course's own environment.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

if TYPE_CHECKING:
    from unit6.ppo import PPOConfig

MOVES = torch.tensor([[-1, 0], [1, 0], [0, -1], [0, 1]])


def learner_ppo():
    """Your ppo.py, imported when a loop first needs it (``ppo=None``)."""
    import unit6.ppo as ppo

    return ppo


@contextlib.contextmanager
def one_thread():
    """Tiny tensors: one thread is faster than several, especially on a shared machine."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


class GridWorld:
    def __init__(self, num_envs: int = 16, size: int = 5, max_steps: int = 30, step_penalty: float = 0.02):
        self.num_envs, self.size, self.max_steps, self.step_penalty = num_envs, size, max_steps, step_penalty
        self.pos = torch.zeros(num_envs, 2, dtype=torch.long)
        self.t = torch.zeros(num_envs, dtype=torch.long)

    @property
    def obs_dim(self) -> int:
        return self.size * self.size

    def observe(self) -> torch.Tensor:
        """One-hot of the cell: [num_envs, size * size] float32."""
        cell = self.pos[:, 0] * self.size + self.pos[:, 1]
        return nn.functional.one_hot(cell, self.obs_dim).float()

    def reset(self) -> torch.Tensor:
        self.pos.zero_()
        self.t.zero_()
        return self.observe()

    def step(self, actions: torch.Tensor):
        """Returns (next_obs, rewards, dones); finished environments are already reset in next_obs."""
        self.pos = (self.pos + MOVES[actions]).clamp(0, self.size - 1)
        self.t += 1
        at_goal = (self.pos == self.size - 1).all(dim=1)
        rewards = torch.where(at_goal, torch.tensor(1.0), torch.tensor(-self.step_penalty))
        dones = at_goal | (self.t >= self.max_steps)
        self.pos[dones] = 0
        self.t[dones] = 0
        return self.observe(), rewards, dones.float()


class ActorCritic(nn.Module):
    """Two small MLPs over the observation: action logits and a state value."""

    def __init__(self, obs_dim: int, n_actions: int = 4, hidden: int = 64, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.actor = nn.Sequential(nn.Linear(obs_dim, hidden), nn.Tanh(), nn.Linear(hidden, n_actions))
        self.critic = nn.Sequential(nn.Linear(obs_dim, hidden), nn.Tanh(), nn.Linear(hidden, 1))

    def evaluate(self, obs: torch.Tensor, actions: torch.Tensor):
        """obs [..., obs_dim], actions [...] -> (logp, entropy, values), each [...]."""
        logits = self.actor(obs)
        logp_all = torch.log_softmax(logits, dim=-1)
        logp = logp_all.gather(-1, actions.long().unsqueeze(-1)).squeeze(-1)
        entropy = -(logp_all.exp() * logp_all).sum(-1)
        return logp, entropy, self.critic(obs).squeeze(-1)

    @torch.no_grad()
    def act(self, obs: torch.Tensor, generator: torch.Generator | None = None, greedy: bool = False):
        logits = self.actor(obs)
        if greedy:
            actions = logits.argmax(-1)
        else:
            actions = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator).squeeze(-1)
        logp = torch.log_softmax(logits, -1).gather(-1, actions.unsqueeze(-1)).squeeze(-1)
        return actions, logp, self.critic(obs).squeeze(-1)


@torch.no_grad()
def collect_rollout(env: GridWorld, agent: ActorCritic, obs: torch.Tensor, steps: int, generator: torch.Generator):
    """``steps`` steps of every environment; tensors are [steps, num_envs(, obs_dim)]."""
    buf = {k: [] for k in ("obs", "actions", "logp", "values", "rewards", "dones")}
    for _ in range(steps):
        actions, logp, values = agent.act(obs, generator)
        next_obs, rewards, dones = env.step(actions)
        for key, value in zip(buf, (obs, actions, logp, values, rewards, dones)):
            buf[key].append(value)
        obs = next_obs
    rollout = {k: torch.stack(v) for k, v in buf.items()}
    _, _, next_value = agent.act(obs, generator, greedy=True)
    return rollout, obs, next_value


def episode_returns(rewards: torch.Tensor, dones: torch.Tensor) -> list[float]:
    """Returns of the episodes that finished inside a rollout ([T, num_envs]); the first
    (partial) episode of each environment is counted from the rollout's start."""
    finished, running = [], torch.zeros(rewards.shape[1])
    for t in range(rewards.shape[0]):
        running += rewards[t]
        for e in torch.nonzero(dones[t]).flatten().tolist():
            finished.append(float(running[e]))
            running[e] = 0.0
    return finished


@torch.no_grad()
def greedy_return(agent: ActorCritic, size: int = 5, max_steps: int = 30) -> float:
    """Return of one episode following the most likely action (the grid is deterministic)."""
    env = GridWorld(1, size, max_steps)
    obs, total = env.reset(), 0.0
    for _ in range(max_steps):
        actions, _, _ = agent.act(obs, greedy=True)
        obs, reward, done = env.step(actions)
        total += float(reward[0])
        if done[0]:
            break
    return total


def train_gridworld(seed: int = 0, updates: int = 30, num_envs: int = 16, steps: int = 32, lr: float = 3e-3,
                    gamma: float = 0.95, lam: float = 0.95, cfg: PPOConfig | None = None, ppo=None) -> list[dict]:
    """PPO on the gridworld.  One entry per update: ppo_update's statistics, then the mean return
    of the episodes that finished in its rollout and the greedy policy's return after the update
    (measured by this loop: a statistic of ppo_update's with the same name does not replace them).

    ``ppo``: where compute_gae, masked_whiten, ppo_update and PPOConfig come from (None: your ppo.py).
    """
    ppo = learner_ppo() if ppo is None else ppo
    cfg = cfg or ppo.PPOConfig(epochs=4, minibatch_size=128, ent_coef=0.01, vf_clip_eps=None, max_grad_norm=0.5)
    with one_thread():
        return _train(seed, updates, num_envs, steps, lr, gamma, lam, cfg, ppo)


def _train(seed, updates, num_envs, steps, lr, gamma, lam, cfg, ppo) -> list[dict]:
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    env = GridWorld(num_envs)
    agent = ActorCritic(env.obs_dim, seed=seed)
    optimizer = torch.optim.Adam(agent.parameters(), lr=lr, eps=1e-5)
    obs = env.reset()
    history = []
    for _ in range(updates):
        rollout, obs, next_value = collect_rollout(env, agent, obs, steps, generator)
        advantages, returns = ppo.compute_gae(rollout["rewards"], rollout["values"], rollout["dones"], gamma, lam,
                                              next_value)
        flat = lambda x: x.reshape(steps * num_envs, *x.shape[2:])  # noqa: E731
        batch = {"obs": flat(rollout["obs"]), "actions": flat(rollout["actions"]), "logp_old": flat(rollout["logp"]),
                 "values_old": flat(rollout["values"]), "returns": flat(returns),
                 "advantages": ppo.masked_whiten(flat(advantages), torch.ones(steps * num_envs))}
        stats = ppo.ppo_update(agent, optimizer, batch, cfg, generator)
        finished = episode_returns(rollout["rewards"], rollout["dones"])
        history.append({**stats, "return": sum(finished) / max(len(finished), 1), "episodes": len(finished),
                        "greedy_return": greedy_return(agent)})
    return history
