"""SiMPO for chunked diffusion policies: the off-policy agent plugged into the trainer.

Shape glossary
    B   states in a batch
    N   particles per state
    O   n_obs_steps; H horizon; Da action dim; C global conditioning dim; Do, Dc critic input dims

Per actor update (SIMPO.md, two-stage measure matching):
    1. particles a_1..a_N ~ pi_old(.|s) (a periodically refreshed copy of the denoiser), sampled with
       few DDIM steps (cheap), optionally plus Gaussian exploration noise;
    2. Q(s, a_i) from the twin critics (mean of the two, as the reference recipe);
    3. w = N * solve_weights(Q, lambda, g, b).weights   (mean weight 1 per state);
    4. loss = weighted denoising loss of the current model on the particles, one random diffusion
       timestep per particle (all denoising steps are trained), per-element clipped squared error;
       by default with the weight-1 part matched to pi_old's network output (see below);
    5. lambda learned toward a target KL of the weights from uniform (gathered over processes).
Critic: twin Q on (observation history, executed chunk), TD target with clipped double Q, EMA targets.
The next chunk of the TD target is by default the one the behaviour policy actually sampled at the next
state (free: no sampling per critic update); `--simpo.target actor` samples it from the current actor as
the reference recipe does.

Changes from the reference recipe for fine-tuning a pretrained policy, and the measurements behind them
(fetch_push, shipped checkpoint, 42% over the same 50 episodes; 300 actor updates with *uniform* weights,
i.e. what the update does when the critic cannot tell particles apart):
    - uncentred loss, 5-step particles, noise 0.1, clipped: 12%; 10-step particles, no noise, clipped:
      26%; unclipped: 30%. Re-fitting a model to its own samples is not a fixed point: sampler and model
      error compound with every pi_old refresh (the gripper dimension, saturated at the range edge in the
      demonstrations, drifts inward fastest because clipping truncates one side).
    - centring the weights (w - 1, weight-1 part dropped) makes that update zero, but half the particles
      are then repulsive and repulsion feeds itself (the error it pushes up has a growing gradient, up to
      the clip): 44% -> 16% rollout success in 5k steps, actions far off (gripper mean -0.99 -> +0.06).
    - so the weight-1 part is kept, but matched to pi_old's *output* at the same noisy input
      (`self_fit pi_old`): sum_i (w_i - 1) l(eps_theta, eps_i) + l(eps_theta, eps_old). Per particle the
      quadratic term in eps_theta is w_i as in the paper, and with uniform weights the gradient at
      theta = pi_old is exactly zero.
"""

import copy
import time
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from simpo_robot.rl.actor import DiffusionActor, FlowActor
from simpo_robot.rl.agent import ChunkBatch, Stepper
from simpo_robot.rl.chunks import n_step_return
from simpo_robot.rl.critic import TwinCritic, ema_update, td_target
from simpo_robot.rl.replay import ReplayBuffer, Transition
from simpo_robot.simpo import LearnedTemperature, solve_weights, weight_kl_from_uniform
from simpo_robot.simpo.weighting import WEIGHTINGS

TARGETS = ("behaviour", "actor")
SELF_FITS = ("pi_old", "samples")

# A replayed transition plus the chunk the behaviour policy sampled at its next state (for the TD target).
SimpoTransition = NamedTuple("SimpoTransition", [*Transition.__annotations__.items(), ("next_chunk", Tensor)])


@dataclass
class SimpoConfig:
    """SiMPO's knobs besides the weighting and the negative bound (which are top-level flags)."""

    particles: int = 16
    """N: particles drawn from pi_old per state."""
    particle_steps: int = 5
    """Sampler steps for particles (DDIM for diffusion, Euler for flow; also for `target actor`):
    fewer than the policy's own, to make them cheap."""
    particle_noise: float = 0.0
    """Std of Gaussian exploration noise added to particles, in the model's normalised action units
    (the reference recipe uses 0.2 when training from scratch)."""
    clip_particles: bool = False
    """Clip particles (and their x0 predictions while sampling) to the action range as the policy's own
    sampler does. Off: the model is fitted to its unclipped samples (clipping truncates one side of
    range-saturated dimensions, which then drift inward); the critic always scores clipped chunks."""
    self_fit: str = "pi_old"
    """How the weight-1 part of the loss is matched: "pi_old" (to pi_old's network output at the same noisy
    input; exact trust region, no re-fitting to samples) or "samples" (the paper's loss as written)."""
    target: str = "behaviour"
    """Next chunk of the TD target: "behaviour" (the chunk sampled at the next state while acting) or
    "actor" (a fresh sample from the current actor with the particle sampler, the reference recipe)."""
    n_step: int = 1
    """Chunks per TD target: the critic regresses on the discounted reward of the next n executed chunks and
    bootstraps from the state after them (fewer at the episode's end). Larger n carries the outcome back to
    early chunks in fewer target updates, with more of the behaviour policy's noise; the buffer holds one
    phase of the current policy's data, so the n-chunk return is (nearly) on-policy."""
    refresh_every: int = 50
    """Actor updates between refreshes of pi_old (a hard copy of the denoiser)."""
    weighting_critic_every: int = 0
    """0: particles are weighted by the online critic, which changes with every critic update. N > 0: by a
    copy of it taken every N actor updates (at the first one, then every N), so that N actor updates in a row
    improve on one fixed Q. Against a critic frozen after warm-up the actor update improves fetch_push for
    about 150 updates (BENCHMARKS.md "actor_probe"); online, a copy every 100 did not stop the decline
    (fetch_push 44 -> 20 percent at 60k env steps, against 21 with the online critic)."""
    target_kl: float = 0.05
    """Target KL(weights || uniform) of the learned temperature. Small: the critic's ranking of particles is
    mostly noise on these tasks, and with 1.0 every variant collapsed fetch_push to 9 percent success (BENCHMARKS.md)."""
    init_temperature: float = 1.0
    temperature_lr: float = 3e-2
    standardise_q: bool = True
    """Divide each state's particle Q values by their std before weighting (so lambda is in units of the
    per-state Q spread). With sparse rewards the spread differs by orders of magnitude between states and
    over training; one global lambda then gives uniform weights in most states. Weights are invariant to
    the shift, so only the scale matters."""
    loss_clip: float = 5.0
    """Per-element bound on the squared denoising error (bounds the repulsive term)."""
    buffer_size: int = 15_000
    """Replay capacity in chunk transitions. The default holds one phase (actor_every * actor_burst critic
    updates = 30k env steps with 16 envs and 2-step chunks), so that each phase's critic judges the current
    policy's data only; a buffer that mixes policies lost the first phase's gain (BENCHMARKS.md, fourth round)."""
    learning_starts: int = 2_000
    """Env steps collected before the first (critic) update."""
    actor_starts: int = 30_000
    """Env steps before the first actor update: the weights are only as good as the critic, and updates
    driven by an untrained critic measurably degraded the pretrained policy. (Cheap: before it, fine-tuning
    runs at the acting rate, about 200 env steps/s here.)"""
    critic_updates: int = 4
    """Critic updates per collected chunk (across all envs of a process)."""
    actor_every: int = 15
    """Critic updates per actor update (an actor update costs about 100 critic updates on a CPU)."""
    actor_burst: int = 250
    """Actor updates in a row each time it is the actor's turn. 1: one after every `actor_every` critic updates
    (interleaved). N > 1: N in a row after every `actor_every * N` critic updates (same ratio), against the
    critic as it stands; in between, the policy holds still while the critic fits its new data (policy
    iteration, in phases). Interleaved updates lost fetch_push's early gains (44 -> 33 percent at 300k env
    steps); phases of 30k env steps kept them (BENCHMARKS.md, fourth round)."""
    critic_reset: bool = True
    """Restart the critic (weights, targets, optimiser state) from its initial weights after each actor burst, so
    that each phase's critic is fitted to the current policy's data alone, as the frozen critic of
    benchmarks/actor_probe.py was (a critic trained on across phases can lose the plasticity to re-rank)."""
    batch_size: int = 256
    """Critic batch (transitions)."""
    actor_batch_size: int = 32
    """States per actor update (each with `particles` particles)."""
    actor_lr: float = 3e-5
    critic_lr: float = 3e-4
    tau: float = 0.005
    """EMA rate of the target critics."""
    critic_hidden: tuple[int, ...] = (512, 512, 512)
    """Hidden widths of each twin critic's MLP (on the command line: `--simpo.critic-hidden "[512,512,512]"`).
    On fetch_push, 3x512 ended 7 to 11 points above 2x256 on each of 3 seeds (58.7, 56.2 and 54.3 percent against
    48.1, 49.5 and 44.2), and it kept fetch_pick_place from collapsing (BENCHMARKS.md, fifth round); it costs
    28 percent of the env steps per second."""
    critic_layer_norm: bool = False
    """LayerNorm after each hidden layer of the critics (RLPD's critic), which keeps Q-learning's features
    bounded and the critic plastic."""
    final_burst: bool = True
    """When the run's env steps are spent, one more actor burst against the critic fitted since the last one (no
    new data; that critic is kept, not reset, and saved for acting by it). Without it the last phase's data only
    fits a critic the policy never learns from. On fetch_pick_place (sparse reward, seed 0) it took the 300k run's
    policy from 54.3 to 62.5 percent, and from 52.4 to 71.2 deterministic (208 episodes); against a fetch_push
    run's dense-reward critic it changed nothing (50.7 -> 51.4, a probe). BENCHMARKS.md, fourteenth round."""

    def __post_init__(self):
        for name in ("particles", "particle_steps", "n_step", "refresh_every", "buffer_size", "critic_updates",
                     "actor_every", "actor_burst", "batch_size", "actor_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"simpo.{name} must be >= 1, got {getattr(self, name)}")
        if self.weighting_critic_every < 0:
            raise ValueError(f"simpo.weighting_critic_every must be >= 0 (0: the online critic), "
                             f"got {self.weighting_critic_every}")
        if (self.particle_noise < 0 or self.target_kl < 0 or not self.loss_clip > 0 or self.learning_starts < 0
                or self.actor_starts < 0):
            raise ValueError("simpo.particle_noise, target_kl, learning_starts and actor_starts must be >= 0, "
                             "loss_clip > 0")
        if not (self.init_temperature > 0 and self.temperature_lr > 0 and self.actor_lr > 0 and self.critic_lr > 0):
            raise ValueError("simpo.init_temperature and the learning rates must be > 0")
        if self.self_fit not in SELF_FITS:
            raise ValueError(f"simpo.self_fit must be one of {SELF_FITS}, got {self.self_fit!r}")
        if self.target not in TARGETS:
            raise ValueError(f"simpo.target must be one of {TARGETS}, got {self.target!r}")
        if not 0 < self.tau <= 1:
            raise ValueError(f"simpo.tau must be in (0, 1], got {self.tau}")


class ActorBatch(NamedTuple):
    """What the actor's objective is fed, and the weights for the temperature loss."""

    particles: Tensor
    """(B*N, H, Da) samples of pi_old (model space)"""
    global_cond: Tensor
    """(B*N, C)"""
    weights: Tensor
    """(B*N,) per-particle loss weights: N * normalised (mean 1 per state)"""
    normalised: Tensor
    """(B, N) normalised weights (sum 1 per state)"""
    q: Tensor
    """(B, N) critic values of the particles"""


def critic_obs(state: Tensor, env_state: Tensor) -> Tensor:
    """(B, O, Ds), (B, O, De) -> (B, Do) flattened critic observation."""
    return torch.cat([state, env_state], dim=-1).flatten(1)


class SimpoAgent:
    """SiMPO with any weighting from simpo_robot.simpo (`exp` is the softmax-reweighting baseline)."""

    name = "simpo"

    def __init__(self, cfg: SimpoConfig, weighting: str, negative_bound: float, actor: DiffusionActor | FlowActor,
                 obs_dim: int, device: torch.device):
        if weighting not in WEIGHTINGS:
            raise ValueError(f"unknown weighting {weighting!r}; choose from {sorted(WEIGHTINGS)}")
        if not negative_bound <= 0:
            raise ValueError(f"negative_bound must be <= 0, got {negative_bound}")
        self.cfg, self.weighting, self.negative_bound, self.actor, self.device = (
            cfg, weighting, negative_bound, actor, device)
        self.action_bound = actor.action_bound
        self.critic = TwinCritic(obs_dim, actor.n_action_steps * actor.action_dim, tuple(cfg.critic_hidden),
                                 cfg.critic_layer_norm).to(device)
        self.objective = actor.objective(cfg.loss_clip)
        self.pi_old = copy.deepcopy(actor.unet).requires_grad_(False)
        self.temperature = LearnedTemperature(cfg.init_temperature, cfg.target_kl).to(device)
        self.actor_opt = torch.optim.Adam(self.objective.parameters(), lr=cfg.actor_lr)
        self.critic_opt = torch.optim.Adam(self.critic.parameters(), lr=cfg.critic_lr)
        self.temp_opt = torch.optim.Adam(self.temperature.parameters(), lr=cfg.temperature_lr)
        self.critic_target: TwinCritic | None = None
        self.weighting_critic: TwinCritic | None = None
        """The frozen copy that weights particles (weighting_critic_every > 0), else None (the online critic)."""
        self.buffer: ReplayBuffer | None = None
        self.pending: tuple[Transition, Tensor] | None = None
        """Last chunk's transitions still waiting for their next chunk, and which envs they came from."""
        self.episode: list[tuple[SimpoTransition, Tensor]] = []
        """With n_step > 1: the running episode's transitions (and their env indices) until it ends."""
        self.critic_updates = 0
        self.actor_updates = 0
        self.particle_seconds = 0.0
        self.final_burst_at: int | None = None
        """Env steps at which the final burst ran (so that resuming a finished run does not run it twice)."""

    # --- trainer plumbing --------------------------------------------------------------------------
    def modules_to_prepare(self) -> dict[str, Any]:
        return {"objective": self.objective, "critic": self.critic, "actor_opt": self.actor_opt,
                "critic_opt": self.critic_opt}

    def set_prepared(self, prepared: dict[str, Any], unwrap) -> None:
        for name, obj in prepared.items():
            setattr(self, name, obj)
        # After prepare: DDP has broadcast rank 0's initial critic, so every rank's target starts equal.
        self.critic_target = copy.deepcopy(unwrap(self.critic)).requires_grad_(False)
        self.critic_init = copy.deepcopy(self.critic_target.state_dict())
        """The critic's initial weights (the same on every rank), for critic_reset."""
        if self.cfg.weighting_critic_every:
            self.weighting_critic = copy.deepcopy(self.critic_target)

    def shared_state(self) -> list[Any]:
        frozen = [self.weighting_critic] if self.weighting_critic is not None else []
        return [self.critic_target, self.pi_old, self.temperature, self.temp_opt, *frozen]

    def synced_modules(self) -> list[nn.Module]:
        frozen = [self.weighting_critic] if self.weighting_critic is not None else []
        return [self.objective, self.critic, self.critic_target, self.pi_old, self.temperature, *frozen]

    def rank_state(self) -> dict[str, Any]:
        if self.pending is not None or self.episode:
            raise RuntimeError("SiMPO's state can only be saved between episodes")
        return {"buffer": self.buffer.state_dict() if self.buffer is not None else None,
                "critic_updates": self.critic_updates, "actor_updates": self.actor_updates,
                "particle_seconds": self.particle_seconds, "final_burst_at": self.final_burst_at}

    def load_rank_state(self, state: dict[str, Any]) -> None:
        if state["buffer"] is not None:
            example = SimpoTransition(**{k: v[:1] for k, v in state["buffer"]["storage"].items()})
            self.buffer = ReplayBuffer(self.cfg.buffer_size, example)
            self.buffer.load_state_dict(state["buffer"])
        self.critic_updates, self.actor_updates = state["critic_updates"], state["actor_updates"]
        self.particle_seconds = state["particle_seconds"]
        self.final_burst_at = state.get("final_burst_at")  # (absent from checkpoints older than the option)

    # --- acting and data ---------------------------------------------------------------------------
    def act(self, cond: Tensor, generator: torch.Generator) -> tuple[Tensor, dict[str, Tensor]]:
        return self.actor.sample(self.actor.unet, cond, generator=generator), {}

    def observe(self, batch: ChunkBatch, generator: torch.Generator) -> None:
        """Store transitions once their next chunk is known: the next collected chunk of the same env, or,
        for an episode that ended, a chunk sampled now at its final observation (used only if truncated)."""
        tr = batch.transition
        if self.pending is not None:
            waiting, envs = self.pending
            self._store(waiting, tr.chunk[envs], envs)
        ended = batch.live & batch.ended
        if ended.any():
            with torch.no_grad():
                cond = self.actor.global_cond(tr.next_state[ended].to(self.device),
                                              tr.next_env_state[ended].to(self.device))
                bootstrap = self.act(cond, generator)[0].cpu()
            self._store(Transition(*(x[ended] for x in tr)), bootstrap, ended)
        running = batch.live & ~batch.ended
        self.pending = (Transition(*(x[running] for x in tr)), running) if running.any() else None
        if self.pending is None and self.episode:
            self._store_n_step()

    def _store(self, transitions: Transition, next_chunk: Tensor, envs: Tensor) -> None:
        """One chunk transition for each env in the mask `envs`: into the buffer, or with n_step > 1 into
        the episode's rows until it ends."""
        rows = SimpoTransition(*transitions, next_chunk)
        if self.cfg.n_step > 1:
            self.episode.append((rows, envs.nonzero().squeeze(-1)))
            return
        self._store_rows(rows)

    def _store_n_step(self) -> None:
        """The ended episode's rows as n-chunk transitions, env by env: the reward of the next n chunks, and
        the next state and chunk after them (both from the row `last`)."""
        rows = SimpoTransition(*(torch.cat(field) for field in zip(*(r for r, _ in self.episode), strict=True)))
        env = torch.cat([e for _, e in self.episode])
        self.episode = []
        order = torch.sort(env, stable=True).indices  # each env's rows stay in time order
        for idx in torch.split(order, torch.bincount(env).tolist()):
            if idx.numel() == 0:
                continue
            mine = SimpoTransition(*(x[idx] for x in rows))
            ret = n_step_return(mine.reward, mine.discount, self.cfg.n_step)
            self._store_rows(mine._replace(
                reward=ret.reward, discount=ret.discount, next_state=mine.next_state[ret.last],
                next_env_state=mine.next_env_state[ret.last], next_chunk=mine.next_chunk[ret.last]))

    def _store_rows(self, rows: SimpoTransition) -> None:
        if self.buffer is None:
            self.buffer = ReplayBuffer(self.cfg.buffer_size, rows)
        self.buffer.add(rows)

    def ready(self, env_steps: int) -> bool:
        return env_steps >= self.cfg.learning_starts and self.buffer is not None

    def can_overlap(self, env_steps: int) -> bool:
        """Critic updates alone touch neither the actor nor `generator` (with behaviour targets); a round that
        ends a phase runs the actor burst, which changes the policy that acts."""
        period = self.cfg.actor_every * self.cfg.actor_burst
        burst_due = env_steps >= self.cfg.actor_starts and self.critic_updates % period + self.cfg.critic_updates >= period
        return self.cfg.target == "behaviour" and not burst_due

    # --- updates -----------------------------------------------------------------------------------
    def sample_particles(self, unet: nn.Module, cond: Tensor, generator: torch.Generator) -> Tensor:
        """cond (M, C) -> (M, H, Da) chunks from `unet` with the cheap particle sampler."""
        return self.actor.sample(unet, cond, self.cfg.particle_steps, clip=self.cfg.clip_particles, generator=generator)

    @torch.no_grad()
    def actor_batch(self, batch: SimpoTransition, generator: torch.Generator) -> ActorBatch:
        n, b = self.cfg.particles, batch.state.shape[0]
        cond = self.actor.global_cond(batch.state, batch.env_state).repeat_interleave(n, dim=0)  # (B*N, C)
        particles = self.sample_particles(self.pi_old, cond, generator)
        if self.cfg.particle_noise > 0:
            particles = particles + self.cfg.particle_noise * torch.randn(
                particles.shape, generator=generator, device=particles.device)
        clipped = particles.clamp(-self.action_bound, self.action_bound)  # what the env would be sent
        if self.cfg.clip_particles:
            particles = clipped
        obs = critic_obs(batch.state, batch.env_state).repeat_interleave(n, dim=0)
        critic = self.weighting_critic if self.weighting_critic is not None else self.critic
        q1, q2 = critic(obs, self.actor.executed(clipped).flatten(1))
        q = (0.5 * (q1 + q2)).reshape(b, n)
        scaled = q / q.std(dim=-1, keepdim=True).clamp(min=1e-6) if self.cfg.standardise_q and n > 1 else q
        normalised = solve_weights(scaled, self.temperature.value, self.weighting, self.negative_bound).weights
        weights = n * normalised.reshape(-1)
        return ActorBatch(particles, cond, weights, normalised, q)

    def critic_loss(self, batch: SimpoTransition, generator: torch.Generator) -> Tensor:
        with torch.no_grad():
            if self.cfg.target == "behaviour":
                next_chunk = batch.next_chunk
            else:
                next_cond = self.actor.global_cond(batch.next_state, batch.next_env_state)
                next_chunk = self.sample_particles(self.actor.unet, next_cond, generator)
                next_chunk = next_chunk.clamp(-self.action_bound, self.action_bound)
            next_q = self.critic_target(critic_obs(batch.next_state, batch.next_env_state),
                                        self.actor.executed(next_chunk).flatten(1))
            target = td_target(batch.reward, batch.discount, next_q)
        q = self.critic(critic_obs(batch.state, batch.env_state), self.actor.executed(batch.chunk).flatten(1))
        return F.mse_loss(q.q1, target) + F.mse_loss(q.q2, target)

    def update(self, step: Stepper, gather, generator: torch.Generator, cpu_generator: torch.Generator,
               unwrap, env_steps: int) -> dict[str, float]:
        metrics: dict[str, float] = {}
        for _ in range(self.cfg.critic_updates):
            batch = self._sample(self.cfg.batch_size, cpu_generator)
            loss = self.critic_loss(batch, generator)
            if step(loss, self.critic_opt, self.critic):
                ema_update(self.critic_target, unwrap(self.critic), self.cfg.tau)
            self.critic_updates += 1
            metrics["losses/critic"] = loss.item()
            if self.critic_updates % (self.cfg.actor_every * self.cfg.actor_burst) or env_steps < self.cfg.actor_starts:
                continue
            for _ in range(self.cfg.actor_burst):
                metrics |= self.actor_update(step, gather, generator, cpu_generator, unwrap)
            if self.cfg.critic_reset:
                self.reset_critic(unwrap)
        return metrics

    def finish(self, step: Stepper, gather, generator: torch.Generator, cpu_generator: torch.Generator,
               unwrap, env_steps: int) -> dict[str, float]:
        metrics: dict[str, float] = {}
        if (self.cfg.final_burst and env_steps >= self.cfg.actor_starts and self.buffer is not None
                and self.final_burst_at != env_steps):
            for _ in range(self.cfg.actor_burst):
                metrics |= self.actor_update(step, gather, generator, cpu_generator, unwrap)
            self.final_burst_at = env_steps
        return metrics

    def reset_critic(self, unwrap) -> None:
        """The critic and its targets back to their initial weights, its optimiser's moments cleared."""
        unwrap(self.critic).load_state_dict(self.critic_init)
        self.critic_target.load_state_dict(self.critic_init)
        self.critic_opt.state.clear()

    def actor_update(self, step: Stepper, gather, generator: torch.Generator, cpu_generator: torch.Generator,
                     unwrap) -> dict[str, float]:
        """One actor update on a replay batch (refreshing pi_old and the weighting critic when due) and one
        temperature update; returns its metrics."""
        if self.actor_updates % self.cfg.refresh_every == 0:
            self.pi_old.load_state_dict(self.actor.unet.state_dict())
        if self.weighting_critic is not None and self.actor_updates % self.cfg.weighting_critic_every == 0:
            self.weighting_critic.load_state_dict(unwrap(self.critic).state_dict())
        start = time.perf_counter()
        ab = self.actor_batch(self._sample(self.cfg.actor_batch_size, cpu_generator), generator)
        self.particle_seconds += time.perf_counter() - start
        anchor = self.pi_old if self.cfg.self_fit == "pi_old" else None
        actor_loss = self.objective(ab.particles, ab.global_cond, ab.weights, generator, anchor)
        step(actor_loss, self.actor_opt, self.objective)
        temp_loss = self.temperature.loss(gather(ab.normalised))  # the same lambda on every rank
        self.temp_opt.zero_grad(set_to_none=True)
        temp_loss.backward()
        self.temp_opt.step()
        self.actor_updates += 1
        return {
            "losses/actor": actor_loss.item(), "losses/temperature": temp_loss.item(),
            "charts/temperature": self.temperature.value,
            "simpo/weight_kl": weight_kl_from_uniform(ab.normalised).mean().item(),
            "simpo/negative_mass": ab.normalised.clamp(max=0).abs().sum(-1).mean().item(),
            "simpo/max_weight": ab.weights.max().item(),
            "simpo/q_std": ab.q.std(dim=-1).mean().item(),
            "simpo/particle_std": ab.particles.reshape(*ab.q.shape, -1).std(dim=1).mean().item(),
            "charts/particle_s": self.particle_seconds, "charts/actor_updates": self.actor_updates,
        }

    def _sample(self, batch_size: int, cpu_generator: torch.Generator) -> SimpoTransition:
        return SimpoTransition(*(x.to(self.device) for x in self.buffer.sample(batch_size, cpu_generator)))

    def acting_critic(self, unwrap) -> TwinCritic:
        # The online critic, fitted since the last phase's burst to the policy's own data (a final burst keeps it).
        return unwrap(self.critic)

    def summary(self) -> dict[str, Any]:
        return {"critic_updates": self.critic_updates, "actor_updates": self.actor_updates,
                "particle_s": self.particle_seconds}
