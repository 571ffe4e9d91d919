"""SiT's two samplers for flow-matching models, as diffusers schedulers.

SiT (Ma et al. 2024) reports FID with an Euler-Maruyama SDE sampler and with the adaptive dopri5 ODE
solver; diffusers has neither for flow models. Both read the model the way atdiff trains it
(diffusers' flow convention, ``atdiff.objectives.FlowMatchingObjective``): ``x = (1 - sigma) x0 +
sigma noise`` with sigma in [0, 1], the model predicts the velocity ``u = noise - x0`` and is fed
``timestep = num_train_timesteps * sigma``. SiT writes the same path with ``t = 1 - sigma`` and
velocity ``-u``; the formulas below are SiT's (``transport/transport.py``) in that change of variables.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin, SchedulerOutput
from diffusers.utils.torch_utils import randn_tensor


class FlowMatchEulerMaruyamaScheduler(SchedulerMixin, ConfigMixin):
    r"""SiT's SDE sampler: Euler-Maruyama on the reverse SDE of a linear flow, last step without noise.

    In SiT's time t = 1 - sigma the SDE is ``dx = [v + w(t) score] dt + sqrt(2 w(t)) dW`` with the
    score read from the velocity, ``score = -(x + (1 - sigma) u) / sigma``, and SiT's default diffusion
    coefficient ``w = diffusion_norm * sigma`` (``--diffusion-form sigma``). SiT's defaults (250
    steps, last step 0.04 taken as the mean of the SDE step, "Mean") are this scheduler's: the model
    is evaluated at ``num_inference_steps`` sigmas evenly spaced from 1 to ``last_step_size``; every
    step but the last adds noise, the last one goes to sigma = 0 without it. 250 steps cost 250
    model calls, as in SiT.

    Args:
        num_train_timesteps: timestep = num_train_timesteps * sigma, as in training.
        diffusion_norm: scale of the diffusion coefficient (SiT's ``--diffusion-norm``; 0 gives the ODE).
        last_step_size: the sigma of the last model call, from which one noiseless step reaches 0.
    """

    order = 1

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, diffusion_norm: float = 1.0, last_step_size: float = 0.04):
        if not 0 < last_step_size < 1:
            raise ValueError(f"last_step_size must be in (0, 1), got {last_step_size}")
        if diffusion_norm < 0:
            raise ValueError(f"diffusion_norm must be >= 0, got {diffusion_norm}")
        self.sigmas = torch.tensor([1.0, 0.0])
        self.timesteps = self.sigmas[:-1] * num_train_timesteps
        self.num_inference_steps = None
        self._step_index = 0

    def set_timesteps(self, num_inference_steps: int = 250, device: str | torch.device | None = None) -> None:
        if num_inference_steps < 2:
            raise ValueError(f"the SDE sampler needs at least 2 steps (SiT uses 250), got {num_inference_steps}")
        self.num_inference_steps = num_inference_steps
        evaluated = torch.linspace(1.0, self.config.last_step_size, num_inference_steps, dtype=torch.float64)
        self.sigmas = torch.cat([evaluated, evaluated.new_zeros(1)]).to(device=device, dtype=torch.float32)
        self.timesteps = self.sigmas[:-1] * self.config.num_train_timesteps
        self._step_index = 0

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        return sample

    def step(
        self,
        model_output: torch.Tensor,
        timestep,
        sample: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None = None,
        return_dict: bool = True,
    ) -> SchedulerOutput | tuple:
        """One Euler-Maruyama step from the current sigma to the next; noise from ``generator``."""
        sigma, sigma_next = self.sigmas[self._step_index].item(), self.sigmas[self._step_index + 1].item()
        x, u = sample.float(), model_output.float()
        w = self.config.diffusion_norm * sigma
        # SiT's drift v + w * score in sigma's terms (v = -u, score = -(x + (1 - sigma) u) / sigma).
        drift = -u - w * (x + (1 - sigma) * u) / sigma
        dt = sigma - sigma_next
        prev = x + drift * dt
        if sigma_next > 0:  # the last step is the mean of the SDE step (SiT's last_step="Mean")
            noise = randn_tensor(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            prev = prev + (2 * w * dt) ** 0.5 * noise
        self._step_index += 1
        prev = prev.to(sample.dtype)
        return SchedulerOutput(prev_sample=prev) if return_dict else (prev,)

    def __len__(self) -> int:
        return self.config.num_train_timesteps


# Dormand-Prince 5(4): nodes, stages and the two weight rows, as torchdiffeq's dopri5 (which SiT calls).
DOPRI5_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
DOPRI5_A = (
    (),
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
    (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
)
DOPRI5_B = (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0)
DOPRI5_B_LOW = (5179 / 57600, 0.0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40)
DOPRI5_ERROR = tuple(high - low for high, low in zip(DOPRI5_B, DOPRI5_B_LOW))
# torchdiffeq's step-size controller constants.
SAFETY, MAX_FACTOR, MIN_FACTOR, ORDER = 0.9, 10.0, 0.2, 5
MIN_STEP = 1e-10  # a step this small means the tolerances cannot be met


class _AdaptiveTimesteps:
    """``scheduler.timesteps`` of an adaptive solver: yields the next evaluation time until the solve ends.

    Its length is unknown in advance, so it has none; a progress bar over it counts model calls.
    """

    def __init__(self, scheduler: FlowMatchDopri5Scheduler):
        self.scheduler = scheduler

    def __iter__(self) -> Iterator[torch.Tensor]:
        while not self.scheduler.finished:
            yield self.scheduler.next_timestep


class FlowMatchDopri5Scheduler(SchedulerMixin, ConfigMixin):
    r"""SiT's adaptive ODE sampler: dopri5 with rtol/atol on the probability-flow ODE ``dx/dsigma = u``.

    diffusers' sampling loop calls the model once per ``step()`` at ``scheduler.timesteps``; an
    adaptive Runge-Kutta method needs 6 calls per step at times it chooses as it goes. So this
    scheduler runs the solver as a state machine over model calls: ``timesteps`` is an iterable
    that yields the next time to evaluate, each ``step()`` stores one stage and returns as
    ``prev_sample`` the point where the next stage is evaluated, and once the solve reaches sigma = 0
    ``prev_sample`` is the solution. Any diffusers-style loop (``for t in timesteps: out = model(x,
    t); x = step(out, t, x).prev_sample``) therefore runs it unchanged; ``num_inference_steps`` is
    ignored, as the tolerances decide the number of calls (``num_model_evaluations`` after a solve).

    Every image has its own step size (times are per sample: ``next_timestep`` has shape (batch,)),
    chosen from its own error, so an image does not depend on the others in its batch; SiT's call of
    torchdiffeq shares one step size across the batch. Step-size control, first step and error norm
    (RMS of ``err / (atol + rtol * max(|y0|, |y1|))``) follow torchdiffeq, which SiT uses with its
    defaults ``atol=1e-6, rtol=1e-3`` from t = 0 to 1 (sigma 1 to 0).

    Args:
        num_train_timesteps: timestep = num_train_timesteps * sigma, as in training.
        rtol, atol: relative and absolute tolerance of each step's local error.
    """

    order = 1

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, rtol: float = 1e-3, atol: float = 1e-6):
        if rtol <= 0 or atol <= 0:
            raise ValueError(f"rtol and atol must be positive, got rtol={rtol}, atol={atol}")
        self.num_inference_steps = None
        self.set_timesteps()

    # The solver runs in SiT's time tau = 1 - sigma (from 0 to 1) on dx/dtau = -u.

    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None) -> None:
        """Start a new solve; ``num_inference_steps`` is ignored (the tolerances set the number of calls)."""
        self.timesteps = _AdaptiveTimesteps(self)
        self.device = device
        self.num_model_evaluations = 0
        self.finished = False
        self._phase = "start"
        self._tau = None  # (batch,) float64: start of each sample's current step
        self._h = None  # (batch,) float64: each sample's current step size
        self._y = None  # (batch, ...) the state at tau
        self._k: list[torch.Tensor] = []  # stage derivatives of the current step
        self._probe = None  # (tau, h0, f0) while choosing the first step
        self._eval_tau = torch.zeros((), dtype=torch.float64, device=device)

    @property
    def next_timestep(self) -> torch.Tensor:
        """Where the model is called next: a scalar at the start, then one timestep per sample."""
        return ((1 - self._eval_tau) * self.config.num_train_timesteps).float()

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        return sample

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True, **unused):
        """Record the derivative at the point just evaluated; return the next point to evaluate."""
        if self.finished:
            raise RuntimeError("the solve has ended; call set_timesteps() to start a new one")
        self.num_model_evaluations += 1
        f = -model_output.double()
        if self._phase == "start":
            prev = self._start(sample.double(), f)
        elif self._phase == "probe":
            prev = self._choose_first_step(f)
        else:
            prev = self._stage(f)
        prev = prev.to(sample.dtype)
        return SchedulerOutput(prev_sample=prev) if return_dict else (prev,)

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    # -------------------------------------------------------------------------------------------
    # The state machine: start -> probe -> stages 2..7 of each step (stage 7 is the next step's 1st)
    # -------------------------------------------------------------------------------------------

    def _start(self, y0: torch.Tensor, f0: torch.Tensor) -> torch.Tensor:
        # torchdiffeq's _select_initial_step (Hairer, Norsett & Wanner II.4), per sample: a trial Euler step.
        batch = y0.shape[0]
        self._y, self._k = y0, [f0]
        self._tau = torch.zeros(batch, dtype=torch.float64, device=y0.device)
        scale = self.config.atol + y0.abs() * self.config.rtol
        d0, d1 = self._rms(y0 / scale), self._rms(f0 / scale)
        h0 = torch.where((d0 < 1e-5) | (d1 < 1e-5), torch.full_like(d0, 1e-6), 0.01 * d0 / d1)
        self._probe = (scale, h0, d1)
        self._phase = "probe"
        self._eval_tau = self._tau + h0
        return y0 + self._expand(h0) * f0

    def _choose_first_step(self, f1: torch.Tensor) -> torch.Tensor:
        scale, h0, d1 = self._probe
        d2 = self._rms((f1 - self._k[0]) / scale) / h0
        order = ORDER - 1  # torchdiffeq passes the lower order of the pair
        tiny = (d1 <= 1e-15) & (d2 <= 1e-15)
        h1 = torch.where(tiny, torch.clamp(h0 * 1e-3, min=1e-6), (0.01 / torch.maximum(d1, d2)) ** (1 / (order + 1)))
        self._h = torch.minimum(torch.minimum(100 * h0, h1), 1 - self._tau)
        return self._begin_stage(1)

    def _begin_stage(self, index: int) -> torch.Tensor:
        """The point of stage ``index`` (0-based) of the current step, and its time."""
        self._phase = index
        self._eval_tau = self._tau + DOPRI5_C[index] * self._h
        return self._y + self._combine(DOPRI5_A[index])

    def _stage(self, f: torch.Tensor) -> torch.Tensor:
        self._k.append(f)
        if len(self._k) < len(DOPRI5_C):
            return self._begin_stage(len(self._k))
        return self._finish_step()

    def _finish_step(self) -> torch.Tensor:
        """Accept or reject each sample's step from its error; choose its next step size."""
        y1 = self._y + self._combine(DOPRI5_B)
        tolerance = self.config.atol + self.config.rtol * torch.maximum(self._y.abs(), y1.abs())
        ratio = self._rms(self._combine(DOPRI5_ERROR) / tolerance)
        done = self._tau >= 1
        accept = (ratio <= 1) & ~done
        # torchdiffeq's _optimal_step_size: shrink at most 5x (never after an accepted step), grow at most 10x.
        min_factor = torch.where(ratio < 1, torch.ones_like(ratio), torch.full_like(ratio, MIN_FACTOR))
        factor = torch.clamp(SAFETY / ratio.clamp(min=1e-30) ** (1 / ORDER), max=MAX_FACTOR)
        factor = torch.where(ratio == 0, torch.full_like(ratio, MAX_FACTOR), torch.maximum(factor, min_factor))

        a = self._expand(accept)
        self._y = torch.where(a, y1, self._y)
        k_first = torch.where(a, self._k[-1], self._k[0])  # FSAL: the last stage is f at y1
        self._tau = torch.where(accept, self._tau + self._h, self._tau)
        self._tau = torch.where(accept & (self._tau > 1 - 1e-12), torch.ones_like(self._tau), self._tau)
        self._h = torch.minimum(self._h * factor, 1 - self._tau)
        self._k = [k_first]
        running = self._tau < 1
        if not running.any():
            self.finished = True
            self._eval_tau = self._tau
            return self._y
        if (self._h[running] < MIN_STEP).any():
            raise RuntimeError(
                f"dopri5: step size below {MIN_STEP} at sigma {1 - self._tau[running].min().item():.4g}; the model's "
                f"velocity is not smooth enough for rtol={self.config.rtol}, atol={self.config.atol} (raise them)"
            )
        # A finished sample keeps a zero step: its stages evaluate at its end point and change nothing.
        self._h = torch.where(running, self._h, torch.zeros_like(self._h))
        return self._begin_stage(1)

    def _combine(self, weights: tuple[float, ...]) -> torch.Tensor:
        """h * sum_j weights[j] * k_j, per sample."""
        total = torch.zeros_like(self._y)
        for weight, k in zip(weights, self._k):
            if weight:
                total = total + weight * k
        return self._expand(self._h) * total

    def _expand(self, per_sample: torch.Tensor) -> torch.Tensor:
        return per_sample.view(-1, *[1] * (self._y.dim() - 1))

    @staticmethod
    def _rms(x: torch.Tensor) -> torch.Tensor:
        return x.pow(2).flatten(1).mean(1).sqrt()
