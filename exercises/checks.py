"""The checks: a fixed list for every exercise, each grading one thing the function must get right.

A check is a function of the student's function that returns what it measured (shown in the report)
or raises Fail with what came back and what was expected; `@check(name, what)` registers it in
CHECKS[name], in the order it runs and is reported. The expected answers come from the checker's own
closed forms (closed_forms.py); check.py runs the checks, scores them and reports.

Above the checks: the outcomes (Fail, Crash, Stub), `call`, which runs the student's code, turns anything
raised there (also SystemExit and KeyboardInterrupt) into a Crash that names their line and fails a call that
changed its inputs in place, and the measuring helpers (`returned` and `close`, which also hold the result to
the inputs' dtype and device, `standard_normal`, `uniform_times`, `independent` and `fresh` for what is drawn at
random).

Every exercise is checked twice: against closed forms, on (B, 2) and image-shaped (B, 3, 4, 4) inputs, and in
use, plugged into the algorithm it belongs to (closed_forms.py writes each one out: DDIM sampling, PD's loss,
guided distillation's stage one, the stochastic sampler, a DMD update, backward simulation, DisBack's path),
where a function that is right on its own and wrong in use fails.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import math
import sys
import traceback
from pathlib import Path

import torch

from exercises.closed_forms import BY_HAND  # noqa: F401 - check.py's stand-ins for the other exercises
from exercises.closed_forms import (IMAGES, MIX, WIDE, Generator, LinearScore, NetTeacher, PixelScore, Teacher,
                                    TinyScore, WrongCall, by_hand_cfg, by_hand_ddim_step, by_hand_diffuse,
                                    by_hand_gan_losses, by_hand_invert_ddim, by_hand_renoise, coefficients,
                                    ddim_sampler, ddim_step_on, disback_path, dmd_expected, dmd_update,
                                    dmd_update_expected, guided_by, pd_loss, schedule, snr, stage_one_loss,
                                    stochastic_sampler, two_teacher_steps)

HERE = Path(__file__).resolve().parent
CHECKER_FILES = ("check.py", "checks.py", "closed_forms.py")  # the checker itself: an error in them is never yours

# ----------------------------------------------------------------------------------------
# Outcomes: every failure says what is wrong, and a crash is the student's only if it is in their code
# ----------------------------------------------------------------------------------------


class Fail(Exception):
    """A check's verdict: what came back, and what was expected."""


class Crash(Exception):
    """The student's code raised an exception (its message names the line)."""


class Stub(Exception):
    """The untouched stub: not implemented yet."""


CURRENT = {"name": "", "file": ""}  # the function being graded, and its file (for the line of a crash)


def where(error: BaseException, files: set[str]) -> str:
    """`file line N: code` of the innermost frame of the traceback in one of `files`."""
    files = {str(Path(f).resolve()) for f in files}
    frames = [f for f in traceback.extract_tb(error.__traceback__) if str(Path(f.filename).resolve()) in files]
    if not frames:
        return ""
    frame = frames[-1]
    shown = Path(frame.filename)
    shown = shown.relative_to(HERE.parent) if shown.is_relative_to(HERE.parent) else shown.name
    return f" at {shown} line {frame.lineno}: {(frame.line or '').strip()}"


# ----------------------------------------------------------------------------------------
# What the checker relies on stays the checker's: torch's functions and its own closed forms
# ----------------------------------------------------------------------------------------

TORCH_NAMES = ("Generator", "arange", "as_tensor", "autograd", "cat", "cos", "enable_grad", "equal", "float32",
               "float64", "full", "full_like", "is_tensor", "linspace", "long", "manual_seed", "no_grad", "ones",
               "rand", "rand_like", "randint", "randn", "randn_like", "sigmoid", "sin", "softmax", "stack", "tensor",
               "where", "zeros", "zeros_like", "autocast", "allclose", "isclose")


def trusted() -> dict:
    """{(owner, name): value} of what the checks rely on, taken before any student code runs: the torch functions
    they call, the methods of torch.Tensor and nn.Module, autograd's entry points, the closed forms and the checks
    (each function's code too) and the classes of the stand-ins; (owner, None): how many names a class or module
    holds (nothing added, such as a method that shadows one of torch.Tensor's)."""
    import exercises.closed_forms as closed_forms  # noqa: PLC0415 - imported above, by name

    this = sys.modules[__name__]
    owners = [torch.Tensor, torch._C.TensorBase, torch.nn.Module, closed_forms, this]
    owners += [v for v in vars(closed_forms).values() if isinstance(v, type) and v.__module__ == closed_forms.__name__]
    state = {(torch, name): getattr(torch, name) for name in TORCH_NAMES}
    state.update({(torch.autograd, name): getattr(torch.autograd, name) for name in ("grad", "backward")})
    for owner in owners:
        state.update({(owner, name): value for name, value in vars(owner).items()})
        state[owner, None] = overriding(owner)
    functions = [v for owner in (closed_forms, this) for v in vars(owner).values() if inspect.isfunction(v)]
    functions += [fn for listed in CHECKS.values() for _, fn in listed]
    state.update({(fn, "__code__"): fn.__code__ for fn in functions})
    return state


TRUSTED: dict = {}  # trusted(), once the checks are registered (at the end of this file)


def overriding(owner) -> int:
    """How many callables a class defines that change behaviour: operators (dunders) and methods that shadow a
    base class's. Other names that Python or torch add on their own (a class's `__annotations__`, caches) do not
    count; for a module, none does."""
    bases = getattr(owner, "__mro__", (owner,))[1:]
    return sum(1 for k, v in vars(owner).items() if callable(v) and isinstance(owner, type)
               and (k.startswith("__") and k.endswith("__") or any(k in vars(b) for b in bases)))


def now(owner, name):
    if name == "__code__" and inspect.isfunction(owner):
        return owner.__code__
    return overriding(owner) if name is None else vars(owner).get(name, TRUSTED)


def tampered() -> str:
    """What the student's code replaced (all of it put back at once), or ""."""
    changed = [(owner, name) for (owner, name), value in TRUSTED.items()
               if (now(owner, name) != value if name is None else now(owner, name) is not value)]
    if not changed:
        return ""
    owner, name = changed[0]
    for owner_, name_ in changed:  # put back
        with contextlib.suppress(AttributeError, TypeError):
            if name_ is None:
                for extra in [k for k in vars(owner_) if (owner_, k) not in TRUSTED]:
                    delattr(owner_, extra)
            else:
                setattr(owner_, name_, TRUSTED[owner_, name_])
    shown = {torch: "torch", torch.autograd: "torch.autograd", torch._C.TensorBase: "torch.Tensor"}.get(
        owner, getattr(owner, "__qualname__", getattr(owner, "__name__", "?")))
    if owner in (torch, torch.autograd, torch.Tensor, torch._C.TensorBase, torch.nn.Module):
        return f"{shown}.{name}" if name else f"{shown}'s methods (one added)"
    return f"the checker's {shown}" + (f".{name}" if name else "")


REFUSED: list = []  # what the grading process's audit hook (check.py's shield) refused the student's code


def intact(crashed: bool = False) -> None:
    """A Fail if the student's code replaced a torch function or a part of the checker (put back), or tried what
    the grading process refuses it and caught the PermissionError (one it did not catch is its crash)."""
    what = tampered()
    if what or crashed:
        REFUSED.clear()
    if what:
        raise Fail(f"your code replaced {what}: leave torch and the checker as they are (it is put back, and this "
                   "check fails)")
    if REFUSED:
        why = REFUSED[0]
        REFUSED.clear()
        raise Fail(f"your code tried what is refused while it is graded: {why}")


def call(f, *args, **kwargs):
    """f(*args, **kwargs), with anything raised in the student's code (also SystemExit and KeyboardInterrupt)
    turned into a Crash (or a Stub), and a Fail if the call changed one of its tensor inputs in place or replaced
    a torch function or a part of the checker (put back at once)."""
    before = [(name, value, value.detach().clone()) for name, value in tensor_arguments(f, args, kwargs)]
    try:
        try:
            out = f(*args, **kwargs)
        except BaseException:
            intact(crashed=True)
            raise
        intact()
    except (Fail, Stub, Crash):
        raise
    except WrongCall as e:  # a stand-in called the wrong way (the teacher with a guessed null label): a verdict
        raise Fail(str(e)) from None
    except NotImplementedError as e:
        if str(e).startswith("not implemented yet") and f"write {CURRENT['name']} " in str(e):
            raise Stub(str(e)) from None
        raise Crash(f"NotImplementedError: {e}{where(e, student_files())}") from None
    except (SystemExit, KeyboardInterrupt) as e:  # a function must return: exit() is a crash, not a verdict
        raise Crash(f"{type(e).__name__}({e}){where(e, student_files())}: a function must return its result, "
                    "not end the program") from None
    except Exception as e:  # noqa: BLE001 - the student's bug, reported with its line
        raise Crash(f"{type(e).__name__}: {e}{where(e, student_files())}") from None
    for name, value, copy in before:
        if not (value.shape == copy.shape and torch.equal(value.detach(), copy)):
            raise Fail(f"{getattr(f, '__name__', 'the function')} changed its input {name} in place; leave the "
                       "inputs as they are (the algorithm reads them again after the call: use out-of-place ops)")
    return out


def tensor_arguments(f, args, kwargs) -> list:
    """[(name, tensor), ...]: the tensors among the arguments, by parameter name where the signature says it."""
    try:
        bound = inspect.signature(f).bind(*args, **kwargs).arguments
    except (TypeError, ValueError):  # no signature, or the call does not fit it (the call itself will say so)
        bound = {**{f"argument {i + 1}": a for i, a in enumerate(args)}, **kwargs}
    return [(name, value) for name, value in bound.items() if isinstance(value, torch.Tensor)]


def student_files() -> set[str]:
    """Files whose lines are the student's: the graded function's file (for the reference, its module), and the
    other files beside the checker (the exercises, the handout's toolkit.py), never the checker's own."""
    return {CURRENT["file"]} | {str(p) for p in HERE.glob("*.py") if p.name not in CHECKER_FILES}


def checker_files() -> set[str]:
    return {str(HERE / name) for name in CHECKER_FILES}


# ----------------------------------------------------------------------------------------
# Measuring what came back
# ----------------------------------------------------------------------------------------


def returned(got, shape: tuple, what: str, dtype: torch.dtype | None = torch.float32):
    """The student's return value itself, once it is a tensor of the expected shape, on the CPU (the inputs'
    device) and of the inputs' dtype (`dtype`; None: any), or a Fail saying which it is not."""
    if not isinstance(got, torch.Tensor):
        raise Fail(f"{what} should be a tensor of shape {tuple(shape)}, got a {type(got).__name__}")
    if type(got) is not torch.Tensor:  # a subclass's operators and comparisons are its own
        raise Fail(f"{what} is a {type(got).__name__}, a subclass of torch.Tensor: return a plain torch.Tensor")
    if got.device.type != "cpu":
        raise Fail(f"{what} is on the device {got.device}, the inputs on the cpu: keep the inputs' device "
                   "(torch.randn_like(x), device=x.device)")
    if tuple(got.shape) != tuple(shape):
        raise Fail(f"{what} should have shape {tuple(shape)}, got {tuple(got.shape)}")
    if dtype is not None and got.dtype != dtype:
        raise Fail(f"{what} is {str(got.dtype).removeprefix('torch.')}, the inputs "
                   f"{str(dtype).removeprefix('torch.')}: keep the inputs' dtype (the networks it feeds are fp32)")
    return got


def tensor(got, shape: tuple, what: str, dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
    """`returned`, detached and in float64 for measuring."""
    return returned(got, shape, what, dtype).detach().double()


def close(expected: torch.Tensor, got: torch.Tensor, what: str, atol: float, rtol: float = 0.0,
          dtype: torch.dtype | None = torch.float32) -> str:
    """Entry by entry |got - expected| <= atol + rtol |expected|, or a Fail naming the worst entry; `got` is held
    to the shape of `expected`, the CPU and `dtype` (None: what a pipeline of the checker's computed)."""
    expected = torch.as_tensor(expected, dtype=torch.float64)
    got = tensor(got, expected.shape, what, dtype)
    excess = (got - expected).abs() - (atol + rtol * expected.abs())
    bad = ~(excess <= 0)  # also NaN
    allowed = f"{atol:.0e}" + (f" + {rtol:.0e} |expected|" if rtol else "")
    error = (got - expected).abs().max().item()
    if bad.any():
        i = tuple(int(j) for j in bad.nonzero()[0])
        raise Fail(f"{what}: expected {expected[i].item():.6g} at {list(i)}, got {got[i].item():.6g} "
                   f"(max error {error:.2g}, allowed {allowed})")
    return f"{what}: max error {error:.2g}"


def statistic(name: str, value: float, lo: float, hi: float) -> str:
    """`name = value` or a Fail if the value is outside [lo, hi], shown with the digits that tell them apart."""
    if not lo <= value <= hi:
        digits = next((d for d in (4, 6, 8, 10, 12) if not float(f"{lo:.{d}g}") <= float(f"{value:.{d}g}")
                       <= float(f"{hi:.{d}g}")), 17)
        raise Fail(f"{name} = {value:.{digits}g}, expected in [{lo:.{digits}g}, {hi:.{digits}g}]")
    return f"{name} = {value:.3g}"


def standard_normal(eps: torch.Tensor, what: str) -> str:
    """Mean 0, std 1 and the tail fraction P(|eps| > 2) = 4.55% of a large sample (tolerances of about 6 standard
    errors)."""
    n = eps.numel()
    return ", ".join([statistic(f"mean of {what}", eps.mean().item(), -6 / n**0.5, 6 / n**0.5),
                      statistic(f"std of {what}", eps.std().item(), 1 - 5 / n**0.5, 1 + 5 / n**0.5),
                      statistic(f"P(|{what}| > 2)", (eps.abs() > 2).double().mean().item(),
                                0.0455 - 1.5 / n**0.5, 0.0455 + 1.5 / n**0.5)])


def correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    """The correlation of the entries of a and b (NaN if either holds a NaN)."""
    a, b = a.flatten().double(), b.flatten().double()
    a, b = a - a.mean(), b - b.mean()
    return (a @ b / (a.norm() * b.norm() + 1e-30)).item()


def uniform_times(t, n: int, lo: float, hi: float, what: str) -> str:
    """One time per sample, drawn from U[lo, hi]: the range, the mean and the spread of n draws. The range allows
    fp32's rounding of lo and hi (fp32's 0.02 is 0.0199999996), and discrete times i / 1000 pass."""
    t = tensor(t, (n,), what, dtype=None)
    width, se, fp32 = hi - lo, (hi - lo) / math.sqrt(12 * n), 1e-6
    return ", ".join([statistic(f"min of {what}", t.min().item(), lo - fp32, lo + 0.01 * width),
                      statistic(f"max of {what}", t.max().item(), hi - 0.01 * width, hi + fp32),
                      statistic(f"mean of {what}", t.mean().item(), (lo + hi) / 2 - 6 * se, (lo + hi) / 2 + 6 * se),
                      statistic(f"std of {what}", t.std().item(), width / math.sqrt(12) * 0.95,
                                width / math.sqrt(12) * 1.05)])


def independent(eps: torch.Tensor, what: str, limit: float = 0.15) -> str:
    """The entries of each sample's noise (B, ...) uncorrelated with each other across the batch: |correlation|
    below `limit` for every pair (noise drawn per sample and broadcast over pixels has correlation 1)."""
    flat = eps.detach().double().flatten(1)
    flat = (flat - flat.mean(0)) / (flat.std(0) + 1e-30)
    c = flat.T @ flat / (len(flat) - 1)
    c.fill_diagonal_(0)
    worst = int(c.abs().argmax())
    i, j = divmod(worst, c.shape[1])
    if not abs(c[i, j].item()) < limit:  # also NaN
        raise Fail(f"the entries {i} and {j} of {what} have correlation {c[i, j].item():.2f}: draw one fresh number "
                   "for every entry (torch.randn_like(x)), not one per sample")
    return f"entries of {what} uncorrelated (max |correlation| {abs(c[i, j].item()):.2f})"


def fresh(first: torch.Tensor, second: torch.Tensor, what: str, limit: float = 0.15) -> str:
    """What two calls drew are not the same draw: |correlation| below `limit` (a seed fixed inside the function
    repeats it at every call, and every training update would see the same noise)."""
    c = correlation(first, second)
    if not abs(c) < limit:
        raise Fail(f"two calls drew the same {what} (correlation {c:.2f}): no fixed seed (torch.manual_seed, a "
                   "seeded torch.Generator) inside the function; draw from the global random stream")
    return f"{what} fresh at every call (correlation {c:.2f})"


def scalar_loss(loss) -> torch.Tensor:
    """The loss, or a Fail if it is not a 0-d fp32 tensor on the CPU."""
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise Fail(f"the loss should be a scalar tensor (a mean), got {shape}")
    return returned(loss, (), "the loss")


def gradient(loss, x: torch.Tensor) -> torch.Tensor:
    """d loss / d x, or a Fail if the loss has no gradient in x."""
    if not scalar_loss(loss).requires_grad:
        raise Fail("the loss has no gradient in x (requires_grad is False)")
    (grad,) = call(torch.autograd.grad, loss, x, allow_unused=True)
    return torch.zeros_like(x) if grad is None else grad


def data(n: int, seed: int):
    """n points of MIX with their class labels, and n standard normal eps."""
    g = torch.Generator().manual_seed(seed)
    x, labels = MIX.sample(n, g)
    return x, labels, torch.randn(n, 2, generator=g)


def image_data(n: int, seed: int):
    """n (3, 4, 4) images of IMAGES with their class labels, and n standard normal eps of their shape."""
    g = torch.Generator().manual_seed(seed)
    x, labels = IMAGES.sample(n, g)
    return x, labels, torch.randn(x.shape, generator=g)


def randn(*shape, seed: int) -> torch.Tensor:
    """Standard normal draws of their own seed (the checks' inputs do not depend on each other)."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------
# The checks, exercise by exercise
# ----------------------------------------------------------------------------------------

CHECKS: dict[str, list] = {}  # {exercise: [(what it checks, check), ...]}


def check(name: str, what: str):
    """Register a check of exercise `name`: a function of the student's function that returns what it
    measured, or raises Fail."""

    def register(fn):
        CHECKS.setdefault(name, []).append((what, fn))
        return fn

    return register


# ----------------------------------------------------------------------------------------
# basics
# ----------------------------------------------------------------------------------------


def pair(got, shape, what: str):
    if not isinstance(got, (tuple, list)) or len(got) != 2:
        raise Fail(f"{what} should return two tensors (alpha_t, sigma_t), got a {type(got).__name__}")
    return returned(got[0], shape, "alpha_t"), returned(got[1], shape, "sigma_t")


@check("alpha_sigma", "alpha_t = cos(pi t / 2) and sigma_t = sin(pi t / 2), entry by entry, at 101 times in [0, 1] "
       "(to fp32's precision: sqrt(1 - alpha_t^2) passes)")
def _(f):
    t = torch.linspace(0, 1, 101)
    alpha, sigma = pair(call(f, t), (101,), "alpha_sigma(t)")
    a, s = schedule(t)
    return close(a, alpha, "alpha_t", 1e-5) + "; " + close(s, sigma, "sigma_t", 1e-5)


@check("alpha_sigma", "a float t gives two 0-d tensors, a (3, 4) tensor of times two (3, 4) tensors")
def _(f):
    alpha, sigma = pair(call(f, 0.3), (), "alpha_sigma(0.3)")
    close(schedule(0.3)[0], alpha, "alpha_0.3", 1e-5)
    t = torch.rand(3, 4, generator=torch.Generator().manual_seed(0))
    alpha, sigma = pair(call(f, t), (3, 4), "alpha_sigma of a (3, 4) tensor")
    return close(schedule(t)[0], alpha, "alpha_t", 1e-5) + "; " + close(schedule(t)[1], sigma, "sigma_t", 1e-5)


@check("alpha_sigma", "the ends exactly: alpha_0 = 1, sigma_0 = 0 and alpha_1 = 0 (fp32 cos(pi / 2) is -4e-8: "
       "clamp it)")
def _(f):
    for t in (0.0, 1.0, torch.tensor([0.0, 1.0])):
        alpha, sigma = pair(call(f, t), torch.as_tensor(t).shape, f"alpha_sigma({t})")
        ends = torch.as_tensor(t).flatten().tolist()
        for ti, ai, si in zip(ends, alpha.flatten().tolist(), sigma.flatten().tolist()):
            if (ti == 0 and (ai != 1 or si != 0)) or (ti == 1 and ai != 0):
                raise Fail(f"at t = {ti:g} got alpha = {ai!r}, sigma = {si!r}; expected exactly alpha_0 = 1, "
                           "sigma_0 = 0, alpha_1 = 0")
    return "exact"


def samples(mixture, n: int, seed: int):
    """n noise samples z of the mixture's shape and n class labels."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *mixture.means.shape[1:], generator=g), torch.randint(8, (n,), generator=g)


SHAPES = ((MIX, 256), (IMAGES, 64))  # the data of the checks in use: (B, 2) points and (B, 3, 4, 4) images


@check("alpha_sigma", "in use: 8 DDIM steps of the exact teacher on your schedule ((B,) times), on (B, 2) and "
       "image-shaped (B, 3, 4, 4) samples, land where the closed form's do")
def _(f):
    def schedule_of(t):
        return pair(call(f, t), t.shape, "alpha_sigma(t)")

    details = []
    for mixture, n in SHAPES:
        z, labels = samples(mixture, n, 3)
        step = ddim_step_on(lambda t, n=n: schedule_of(torch.full((n,), float(t))))
        got = ddim_sampler(Teacher(mixture), z, 8, labels, step)
        details.append(close(ddim_sampler(Teacher(mixture), z, 8, labels), got, f"the DDIM sample {tuple(z.shape)}",
                             1e-4))
    return "; ".join(details)


@check("ddim_step", "z_s = alpha_s x_hat + sigma_s (z_t - alpha_t x_hat) / sigma_t entry by entry, for any x_hat "
       "and z_t, at float times 0.7 -> 0.4, 0.9 -> 0.85, 1 -> 0.5")
def _(f):
    x_hat, z_t = randn(512, 2, seed=1), randn(512, 2, seed=2)
    details = []
    for t, s in ((0.7, 0.4), (0.9, 0.85), (1.0, 0.5)):
        details.append(close(by_hand_ddim_step(x_hat, z_t, t, s), call(f, x_hat, z_t, t, s), f"{t} -> {s}", 1e-5))
    return "; ".join(details)


@check("ddim_step", "at s = 0 the step returns x_hat (0.3 -> 0 and 1 -> 0)")
def _(f):
    x_hat, z_t = randn(512, 2, seed=3), randn(512, 2, seed=4)
    return "; ".join(close(x_hat, call(f, x_hat, z_t, t, 0.0), f"{t} -> 0", 1e-5) for t in (0.3, 1.0))


@check("ddim_step", "per-example times: t and s (B,) tensors, every row its own step")
def _(f):
    g = torch.Generator().manual_seed(5)
    x_hat, z_t = randn(512, 2, seed=6), randn(512, 2, seed=7)
    t = 0.3 + 0.7 * torch.rand(512, generator=g)
    s = t * torch.rand(512, generator=g)
    return close(by_hand_ddim_step(x_hat, z_t, t, s), call(f, x_hat, z_t, t, s), "(B,) times", 1e-5)


@check("ddim_step", "image-shaped latents (B, 3, 4, 4) with (B,) times")
def _(f):
    x_hat, z_t = randn(16, 3, 4, 4, seed=8), randn(16, 3, 4, 4, seed=9)
    t = torch.linspace(0.5, 1.0, 16)
    return close(by_hand_ddim_step(x_hat, z_t, t, t - 0.25), call(f, x_hat, z_t, t, t - 0.25), "(B, 3, 4, 4)", 1e-5)


def pd_case(f, i, n: int, seed: int, mixture=MIX, atol: float = 1e-4, **pieces):
    """PD's target x_tilde at t = i / N: `f` the target (a function of (teacher, z_t, t, labels, N)), or None and
    `pieces` (step=, invert=) the student's DDIM step or inversion inside the closed form's target."""
    x, labels, eps = (data if mixture is MIX else image_data)(len(i) if torch.is_tensor(i) and i.dim() else 512, seed)
    t = torch.as_tensor(i, dtype=torch.float32).expand(len(x)) / n
    z_t = by_hand_diffuse(x, t, eps)
    expected = two_teacher_steps(z_t, t, labels, n, mixture.denoiser)
    got = (call(f, Teacher(mixture), z_t, t, labels, n) if f is not None else
           two_teacher_steps(z_t, t, labels, n, mixture.denoiser, **pieces))
    return close(expected, got, f"x_tilde at N = {n}, {tuple(z_t.shape)}", atol, 1e-3 if n > 100 else 1e-4)


def as_step(f):
    """The student's DDIM step, its result held to the shape, dtype and device of z_t."""
    return lambda x_hat, z_t, t, s: returned(call(f, x_hat, z_t, t, s), z_t.shape, "z_s", z_t.dtype)


@check("ddim_step", "in use: 8-step DDIM sampling of the exact teacher on (B, 2) and (B, 3, 4, 4), and PD's target "
       "(two steps, then the inversion from the same z_t) on your step, land where the closed form's do")
def _(f):
    details = []
    for mixture, n in SHAPES:
        z, labels = samples(mixture, n, 4)
        got = ddim_sampler(Teacher(mixture), z, 8, labels, as_step(f))
        details.append(close(ddim_sampler(Teacher(mixture), z, 8, labels), got, f"the DDIM sample {tuple(z.shape)}",
                             1e-4))
    i = torch.randint(1, 9, (512,), generator=torch.Generator().manual_seed(5))
    return "; ".join([*details, pd_case(None, i, 8, 6, step=as_step(f))])


@check("invert_ddim", "x_tilde = (z_s - (sigma_s / sigma_t) z_t) / (alpha_s - (sigma_s / sigma_t) alpha_t) entry "
       "by entry, at float times 0.8 -> 0.55 and 0.6 -> 0.5")
def _(f):
    z_t, z_s = randn(512, 2, seed=10), randn(512, 2, seed=11)
    return "; ".join(close(by_hand_invert_ddim(z_t, z_s, t, s), call(f, z_t, z_s, t, s), f"{t} -> {s}", 1e-5, 1e-4)
                     for t, s in ((0.8, 0.55), (0.6, 0.5)))


@check("invert_ddim", "one DDIM step from z_t with x_tilde lands on z_s, also at t = 1 (alpha_t = 0) and s = 0")
def _(f):
    z_t, z_s = randn(512, 2, seed=12), randn(512, 2, seed=13)
    return "; ".join(close(z_s, by_hand_ddim_step(tensor(call(f, z_t, z_s, t, s), (512, 2), "x_tilde").float(),
                                                  z_t, t, s), f"{t} -> {s}", 1e-4)
                     for t, s in ((1.0, 0.75), (0.25, 0.0), (1.0, 0.0)))


@check("invert_ddim", "per-example times: t and s (B,) tensors")
def _(f):
    g = torch.Generator().manual_seed(14)
    z_t, z_s = randn(512, 2, seed=15), randn(512, 2, seed=16)
    t = 0.3 + 0.7 * torch.rand(512, generator=g)
    s = t * (0.1 + 0.8 * torch.rand(512, generator=g))
    return close(by_hand_invert_ddim(z_t, z_s, t, s), call(f, z_t, z_s, t, s), "(B,) times", 1e-5, 1e-4)


@check("invert_ddim", "image-shaped latents (B, 3, 4, 4) with (B,) times")
def _(f):
    z_t, z_s = randn(16, 3, 4, 4, seed=17), randn(16, 3, 4, 4, seed=18)
    t = torch.linspace(0.5, 1.0, 16)
    return close(by_hand_invert_ddim(z_t, z_s, t, t - 0.3), call(f, z_t, z_s, t, t - 0.3), "(B, 3, 4, 4)", 1e-5, 1e-4)


@check("invert_ddim", "at PD's finest grid, t - s = 1/1024 (N = 1024), it recovers the x that made z_s (a clamped "
       "denominator shows here), and PD's target on your inversion is the closed form's (N = 8 and 1024)")
def _(f):
    g = torch.Generator().manual_seed(19)
    i = torch.randint(1, 1025, (512,), generator=g)
    t, s = i / 1024, (i - 1) / 1024
    x_hat, z_t = randn(512, 2, seed=20), by_hand_diffuse(randn(512, 2, seed=21), t, randn(512, 2, seed=22))
    z_s = by_hand_ddim_step(x_hat, z_t, t, s)

    def invert(z_t, z_s, t, s):
        return returned(call(f, z_t, z_s, t, s), z_t.shape, "x_tilde", z_t.dtype)

    return "; ".join([close(x_hat, invert(z_t, z_s, t, s), "x_tilde at t - s = 1/1024", 2e-3, 2e-3),
                      pd_case(None, torch.randint(1, 9, (512,), generator=g), 8, 23, invert=invert),
                      pd_case(None, i, 1024, 24, invert=invert, atol=2e-3)])


@check("cfg", "(1 + w) x_cond - w x_uncond entry by entry, at w = 2 and w = 0.5")
def _(f):
    x_c, x_u = randn(64, 2, seed=19), randn(64, 2, seed=20)
    return "; ".join(close((1 + w) * x_c - w * x_u, call(f, x_c, x_u, w), f"w = {w}", 1e-5) for w in (2.0, 0.5))


@check("cfg", "w = 0 is the conditional model x_cond")
def _(f):
    x_c, x_u = randn(64, 2, seed=21), randn(64, 2, seed=22)
    return close(x_c, call(f, x_c, x_u, 0.0), "w = 0", 1e-6)


@check("cfg", "per-example w: a (B,) tensor of weights, on (B, 2) and on image-shaped (B, 3, 4, 4) inputs")
def _(f):
    details = []
    for shape in ((64, 2), (64, 3, 4, 4)):
        x_c, x_u = randn(*shape, seed=23), randn(*shape, seed=24)
        w = torch.linspace(0, 4, 64)
        details.append(close(by_hand_cfg(x_c, x_u, w), call(f, x_c, x_u, w), f"{shape}", 1e-5))
    return "; ".join(details)


@check("cfg", "in use: 8 guided DDIM steps of the exact teacher (your cfg combining its two calls) at w = 2 and at "
       "per-example w in [0, 4], on (B, 2) and (B, 3, 4, 4), land where the closed form's do")
def _(f):
    def combine(x_cond, x_uncond, w):
        return returned(call(f, x_cond, x_uncond, w), x_cond.shape, "the guided x_hat", x_cond.dtype)

    details = []
    for mixture, n in SHAPES:
        z, labels = samples(mixture, n, 25)
        for w in (2.0, torch.linspace(0, 4, n)):
            expected = ddim_sampler(guided_by(by_hand_cfg, mixture.denoiser, w, 8), z, 8, labels)
            got = ddim_sampler(guided_by(combine, mixture.denoiser, w, 8), z, 8, labels)
            details.append(close(expected, got, f"the guided sample {tuple(z.shape)}, w "
                                                f"{'(B,)' if torch.is_tensor(w) else w}", 1e-4))
    return "; ".join(details)


# ----------------------------------------------------------------------------------------
# progressive distillation
# ----------------------------------------------------------------------------------------


@check("pd_target", "x_tilde entry by entry: two exact-teacher DDIM steps t -> t' = t - 1/(2N) -> t'' = t - 1/N, "
       "then the inversion, with class labels; N = 8 at t = 5/8 and N = 3 at t = 2/3")
def _(f):
    return pd_case(f, 5, 8, 30) + "; " + pd_case(f, 2, 3, 31)


@check("pd_target", "at t = 1 (alpha_t = 0) and at the last interval t = 1/N (t'' = 0: the teacher's second x_hat)")
def _(f):
    return pd_case(f, 8, 8, 32) + "; " + pd_case(f, 1, 8, 33)


@check("pd_target", "per-example times: every row at its own grid time i/N, i = 1..N (N = 8)")
def _(f):
    i = torch.randint(1, 9, (512,), generator=torch.Generator().manual_seed(34))
    return pd_case(f, i, 8, 35)


@check("pd_target", "the teacher is called at t and t' = t - 1/(2N), with the given class labels")
def _(f):
    x, labels, eps = data(64, 36)
    t = torch.full((64,), 0.75)
    teacher = Teacher()
    call(f, teacher, by_hand_diffuse(x, t, eps), t, labels, 4)
    times = [round(float(c[0].flatten()[0]), 4) for c in teacher.calls]
    if times != [0.75, 0.625]:
        raise Fail(f"N = 4, t = 0.75: the teacher was called at t = {times}, expected [0.75, 0.625]")
    if not all(torch.equal(c[1], labels) for c in teacher.calls):
        raise Fail("the teacher was not called with the given labels")
    return f"called at {times}"


@check("pd_target", "image-shaped z_t (B, 3, 4, 4) at N = 8, and PD's finest grid N = 1024 (t - t'' = 1/1024, "
       "where a clamped denominator shows)")
def _(f):
    g = torch.Generator().manual_seed(37)
    return "; ".join([pd_case(f, torch.randint(1, 9, (256,), generator=g), 8, 38, IMAGES),
                      pd_case(f, torch.randint(1, 1025, (512,), generator=g), 1024, 39, atol=2e-3)])


def pd_loss_case(target=None, weight=None, weighting: str = "truncated-snr", n: int = 4, images: bool = False):
    """PD's loss with a student network x_hat = 0.9 z_t + 0.05 at t = i / N, with the student's target or
    weight in it, against the closed form's."""
    x, labels, eps = (image_data if images else data)(256, 41)
    i = torch.randint(1, n + 1, (256,), generator=torch.Generator().manual_seed(42))
    mixture = IMAGES if images else MIX
    weights = {"truncated-snr": lambda t: snr(t).clamp(min=1), "snr+1": lambda t: snr(t) + 1}[weighting]
    pieces = dict(target=target or (lambda teacher, z_t, t, c, n: two_teacher_steps(z_t, t, c, n, mixture.denoiser)),
                  weight=weight or weights)
    got = pd_loss(lambda z_t, t, c: 0.9 * z_t + 0.05, Teacher(mixture), x, labels, n, i, eps, **pieces)
    expected = pd_loss(lambda z_t, t, c: 0.9 * z_t + 0.05, Teacher(mixture), x, labels, n, i, eps, weight=weights,
                       target=lambda teacher, z_t, t, c, n: two_teacher_steps(z_t, t, c, n, mixture.denoiser))
    return close(expected, got, f"PD's loss ({weighting}, N = {n}, {tuple(x.shape[1:])} samples)", 0, 1e-4, None)


@check("pd_target", "in use: PD's loss w(lambda_t) ||x_hat_student(z_t) - x_tilde||^2 at t = i / N (N = 4) on (B, 2) "
       "and (B, 3, 4, 4), with t and z_t read after your target is made, as progressive_distill.pd_loss does")
def _(f):
    def target(teacher, z_t, t, labels, n):
        return returned(call(f, teacher, z_t, t, labels, n), z_t.shape, "x_tilde", z_t.dtype)

    return pd_loss_case(target) + "; " + pd_loss_case(target, images=True)


@check("pd_target", "no gradient reaches the teacher (@no_grad_fp32()): with a teacher that has trainable "
       "parameters, the target does not require grad (N = 8, on (B, 2) and (B, 3, 4, 4))")
def _(f):
    details = []
    for mixture in (MIX, IMAGES):
        x, labels, eps = (data if mixture is MIX else image_data)(256, 43)
        t = torch.randint(1, 9, (256,), generator=torch.Generator().manual_seed(44)) / 8
        z_t, teacher = by_hand_diffuse(x, t, eps), NetTeacher(mixture)
        with torch.enable_grad():  # as in training
            got = returned(call(f, teacher, z_t, t, labels, 8), z_t.shape, "x_tilde")
        if got.requires_grad:
            raise Fail(f"the target {tuple(z_t.shape)} requires grad: the gradient of PD's loss would reach the "
                       "teacher's parameters. Make it without gradient: keep @no_grad_fp32() above pd_target (or "
                       "compute it under torch.no_grad())")
        details.append(close(two_teacher_steps(z_t, t, labels, 8, mixture.denoiser), got,
                             f"x_tilde {tuple(z_t.shape)}", 1e-4, 1e-4))
    return "no gradient; " + "; ".join(details)



@check("snr_weight", "truncated-snr = max(SNR, 1), SNR = alpha_t^2 / sigma_t^2, entry by entry at 49 times in "
       "[0.02, 0.98] and at t = 1 (relative error)")
def _(f):
    t = torch.cat([torch.linspace(0.02, 0.98, 49), torch.ones(1)])
    return close(snr(t).clamp(min=1), call(f, t, "truncated-snr"), "truncated-snr", 0, 1e-4)


@check("snr_weight", "snr+1 = SNR + 1 entry by entry at the same times (relative error)")
def _(f):
    t = torch.cat([torch.linspace(0.02, 0.98, 49), torch.ones(1)])
    return close(snr(t) + 1, call(f, t, "snr+1"), "snr+1", 0, 1e-4)


@check("snr_weight", "a (4, 3) tensor of times gives (4, 3) weights")
def _(f):
    t = 0.1 + 0.8 * torch.rand(4, 3, generator=torch.Generator().manual_seed(40))
    return close(snr(t) + 1, call(f, t, "snr+1"), "snr+1", 0, 1e-4)


@check("snr_weight", "an unknown weighting ('snr-squared', 'truncated_snr') is an error, not a number (while the "
       "two known ones return weights)")
def _(f):
    t = torch.linspace(0.02, 0.98, 49)
    for name in ("truncated-snr", "snr+1"):
        tensor(call(f, t, name), t.shape, f"snr_weight(t, {name!r})")
    for name in ("snr-squared", "truncated_snr"):
        try:
            got = f(t, name)
        except NotImplementedError as e:
            if str(e).startswith("not implemented yet"):
                raise Stub(str(e)) from None
        except Exception:  # noqa: BLE001, S112 - any clear error will do
            continue
        else:
            raise Fail(f"weighting {name!r} returned a {type(got).__name__} instead of raising an error")
    return "both raise"


@check("snr_weight", "in use: PD's loss weighted by your snr_weight at per-example t = i / N, N = 4 and 1024 (t down "
       "to 1/1024, SNR 4e5), both weightings, on (B, 3, 4, 4)")
def _(f):
    details = []
    for weighting in ("truncated-snr", "snr+1"):
        def weight(t, weighting=weighting):
            return returned(call(f, t, weighting), t.shape, f"snr_weight(t, {weighting!r})")

        details += [pd_loss_case(weight=weight, weighting=weighting, n=n, images=True) for n in (4, 1024)]
    return "; ".join(details)


@check("snr_weight", "at the edges the training loops draw, t = 0, 1e-6, 1e-5 and 2e-5 (t ~ U[0, 1)): finite, with "
       "logSNR clipped to [-20, 20] as logsnr does (SNR = e^20 = 4.85e8), both weightings")
def _(f):
    t = torch.tensor([0.0, 1e-6, 1e-5, 2e-5, 1e-3, 0.5])
    capped = snr(t).clamp(max=math.exp(20.0))
    details = []
    for weighting, expected in (("truncated-snr", capped.clamp(min=1)), ("snr+1", capped + 1)):
        got = returned(call(f, t, weighting), t.shape, f"snr_weight(t, {weighting!r})")
        bad = ~torch.isfinite(got.detach())
        if bad.any():
            i = int(bad.nonzero()[0])
            raise Fail(f"{weighting} at t = {t[i].item():g} is {got[i].item()}: SNR = alpha_t^2 / sigma_t^2 divides "
                       "by sigma_0 = 0; take SNR = exp(logsnr(t)), whose logSNR is clipped to [-20, 20]")
        try:
            details.append(close(expected, got, f"{weighting} at t = 0, 1e-6, 1e-5, 2e-5, 1e-3, 0.5", 0, 1e-3))
        except Fail as e:
            raise Fail(f"{e}. Near t = 0 the weight is e^20 = 4.85e8: SNR = exp(logsnr(t)), whose logSNR is clipped "
                       "to [-20, 20]") from None
    return "; ".join(details)


# ----------------------------------------------------------------------------------------
# guided distillation
# ----------------------------------------------------------------------------------------


def guided_case(f, w, shape_w: str):
    x, labels, eps = data(512, 50)
    t = 0.1 + 0.8 * torch.rand(512, generator=torch.Generator().manual_seed(51))
    z_t = by_hand_diffuse(x, t, eps)
    cond, uncond = MIX.denoiser(z_t, t, labels), MIX.denoiser(z_t, t, torch.full_like(labels, 8))
    return close(by_hand_cfg(cond, uncond, w), call(f, Teacher(), z_t, t, labels, w), shape_w, 1e-5)


@check("guided_target", "(1 + w) x_hat(z_t, c) - w x_hat(z_t, null) of the exact mixture entry by entry, at w = 2 "
       "and 0.5, with class labels, per-example times and the teacher's own null label")
def _(f):
    return guided_case(f, 2.0, "w = 2") + "; " + guided_case(f, 0.5, "w = 0.5")


@check("guided_target", "w = 0 is the conditional teacher")
def _(f):
    return guided_case(f, 0.0, "w = 0")


@check("guided_target", "per-example w: a (B,) tensor of weights in [0, 4]")
def _(f):
    return guided_case(f, torch.linspace(0, 4, 512), "w (B,)")


@check("guided_target", "image-shaped z_t (B, 3, 4, 4) with per-example w, and in use: stage one's loss "
       "w(lambda_t) ||x_hat_student - x_hat^w_teacher||^2 with per-example w in [0, 4] on (B, 2) and (B, 3, 4, 4)")
def _(f):
    def target(teacher, z_t, t, labels, w):
        return returned(call(f, teacher, z_t, t, labels, w), z_t.shape, "the guided target", z_t.dtype)

    def by_hand(teacher, z_t, t, labels, w):
        null = torch.full_like(labels, 8)
        return by_hand_cfg(teacher.mixture.denoiser(z_t, t, labels), teacher.mixture.denoiser(z_t, t, null), w)

    x, labels, eps = image_data(128, 52)
    t, w = 0.1 + 0.8 * torch.rand(128, generator=torch.Generator().manual_seed(53)), torch.linspace(0, 4, 128)
    z_t = by_hand_diffuse(x, t, eps)
    details = [close(by_hand(Teacher(IMAGES), z_t, t, labels, w), target(Teacher(IMAGES), z_t, t, labels, w),
                     "(B, 3, 4, 4), w (B,)", 1e-5)]
    for mixture, (x, labels, eps) in ((MIX, data(256, 54)), (IMAGES, image_data(128, 55))):
        t = 0.05 + 0.9 * torch.rand(len(x), generator=torch.Generator().manual_seed(56))
        w = torch.linspace(0, 4, len(x))
        student = lambda z_t, t, c: 0.9 * z_t + 0.05  # noqa: E731
        expected = stage_one_loss(student, Teacher(mixture), x, labels, w, t, eps, by_hand)
        got = stage_one_loss(student, Teacher(mixture), x, labels, w, t, eps, target)
        details.append(close(expected, got, f"stage one's loss {tuple(x.shape[1:])}", 0, 1e-4, None))
    return "; ".join(details)


def renoise_case(f, s: float, t: float):
    z_s, eps = randn(512, 2, seed=60), randn(512, 2, seed=61)
    return close(by_hand_renoise(z_s, s, t, eps), call(f, z_s, s, t, eps), f"{s} -> {t}", 1e-5)


@check("renoise", "(alpha_t / alpha_s) z_s + sigma_t|s eps entry by entry, sigma_t|s^2 = sigma_t^2 - (alpha_t / "
       "alpha_s)^2 sigma_s^2, for s -> t = 0.2 -> 0.5, 0.5 -> 0.9, 0.7 -> 0.75")
def _(f):
    return "; ".join(renoise_case(f, s, t) for s, t in ((0.2, 0.5), (0.5, 0.9), (0.7, 0.75)))


@check("renoise", "from s = 0 it is the forward process alpha_t z_0 + sigma_t eps; to t = 1 it is pure noise eps")
def _(f):
    return renoise_case(f, 0.0, 0.6) + "; " + renoise_case(f, 0.4, 1.0)


@check("renoise", "it composes with q(z_s | x) into q(z_t | x): from z_s = alpha_s x + sigma_s e, z_t - alpha_t x "
       "has std sigma_t (20000 draws, 0.3 -> 0.8)")
def _(f):
    x = torch.ones(10_000, 2)
    z_s = by_hand_diffuse(x, 0.3, randn(10_000, 2, seed=62))
    z_t = tensor(call(f, z_s, 0.3, 0.8, randn(10_000, 2, seed=63)), (10_000, 2), "z_t")
    a_t, s_t = schedule(0.8)
    noise = (z_t - a_t * x.double()) / s_t
    return ", ".join([statistic("mean of (z_t - alpha_t x) / sigma_t", noise.mean().item(), -0.05, 0.05),
                      statistic("its std", noise.std().item(), 0.97, 1.03)])


@check("renoise", "image-shaped z_s (B, 3, 4, 4), and in use: Meng et al.'s 4-step stochastic sampler of the exact "
       "teacher with your re-noising, on (B, 2) and (B, 3, 4, 4), lands where the closed form's does")
def _(f):
    def forward(z_s, s, t, eps):
        return returned(call(f, z_s, s, t, eps), z_s.shape, "z_t", z_s.dtype)

    z_s, eps = randn(64, 3, 4, 4, seed=64), randn(64, 3, 4, 4, seed=65)
    details = [close(by_hand_renoise(z_s, 0.3, 0.6, eps), forward(z_s, 0.3, 0.6, eps), "0.3 -> 0.6, (B, 3, 4, 4)",
                     1e-5)]
    for mixture, n in SHAPES:
        z, labels = samples(mixture, n, 66)
        noise = {i: randn(*z.shape, seed=67 + i) for i in range(2, 5)}
        expected = stochastic_sampler(Teacher(mixture), z, 4, labels, noise)
        got = stochastic_sampler(Teacher(mixture), z, 4, labels, noise, forward)
        details.append(close(expected, got, f"the stochastic sample {tuple(z.shape)}", 1e-4))
    return "; ".join(details)


# ----------------------------------------------------------------------------------------
# DMD
# ----------------------------------------------------------------------------------------



def dmd_gradient_case(f, labels, what):
    g = torch.Generator().manual_seed(70)
    x = WIDE.sample(512, g)[0].requires_grad_(True)
    t, eps = 0.05 + 0.9 * torch.rand(512, generator=g), torch.randn(512, 2, generator=g)
    grad = gradient(call(f, x, MIX.denoiser, WIDE.denoiser, labels, t=t, eps=eps), x)
    expected = dmd_expected(x, t, eps, MIX.denoiser, WIDE.denoiser, labels)
    return close(expected, grad * x.numel(), what, 1e-5, 1e-3)


@check("dmd_generator_loss", "the loss's gradient in x (times x.numel()) is (mu_fake - mu_real) / mean|x - mu_real| "
       "entry by entry, with class labels (relative tolerance 1e-3: clamping or adding NORMALISER_EPS both pass)")
def _(f):
    labels = torch.randint(8, (512,), generator=torch.Generator().manual_seed(71))
    return dmd_gradient_case(f, labels, "class labels")


@check("dmd_generator_loss", "the same with the null label (unconditional real and fake scores)")
def _(f):
    return dmd_gradient_case(f, torch.full((512,), 8), "null label")



@check("dmd_generator_loss", "image-shaped x (B, 3, 4, 4): the normaliser is per sample, over all but the batch "
       "dimension")
def _(f):
    g = torch.Generator().manual_seed(72)
    x = (torch.randn(32, 3, 4, 4, generator=g) + torch.linspace(-2, 2, 32)[:, None, None, None]).requires_grad_(True)
    t, eps, labels = torch.full((32,), 0.5), torch.randn(32, 3, 4, 4, generator=g), torch.zeros(32, dtype=torch.long)
    real, fake = LinearScore(0.5, 0.0), LinearScore(0.8, 0.1)
    grad = gradient(call(f, x, real, fake, labels, t=t, eps=eps), x)
    with torch.no_grad():
        expected = dmd_expected(x, t, eps, real, fake, labels)
    return close(expected, grad * x.numel(), "(B, 3, 4, 4)", 1e-5, 1e-3)


def scores_after_backward(f, fake_b: float, seed: int):
    """The loss at x (64, 2) with real score 0.5 z and fake score (0.5 + fake_b) z + fake_b, backpropagated; x's
    gradient, or a Fail if a score's parameters got one."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 2, generator=g).requires_grad_(True)
    real, fake = LinearScore(0.5, 0.0), LinearScore(0.5 + 3 * fake_b, fake_b)
    loss = scalar_loss(call(f, x, real, fake, torch.zeros(64, dtype=torch.long), t=torch.full((64,), 0.5),
                            eps=torch.randn(64, 2, generator=g)))
    if loss.requires_grad:
        call(loss.backward)
    touched = [name for name, score in (("real", real), ("fake", fake)) for p in score.parameters()
               if p.grad is not None and p.grad.abs().sum() > 0]
    if touched:
        raise Fail(f"the {touched[0]} score's parameters got a gradient: compute both scores without gradient "
                   "(with no_grad_fp32(): ...)")
    return torch.zeros_like(x) if x.grad is None else x.grad


@check("dmd_generator_loss", "the gradient is exactly 0 when the fake score equals the real one, and no gradient "
       "reaches the scores' parameters")
def _(f):
    grad = scores_after_backward(f, 0.0, 73)
    return close(torch.zeros_like(grad), grad, "gradient", 0)


def recorded_noise(score, x: torch.Tensor, call_index: int = 0):
    """The t and eps of the `call_index`-th call of a recording score: eps from x_t = alpha_t x + sigma_t eps."""
    z_t, t, _ = score.calls[call_index]
    t = tensor(t, (len(x),), "the t the scores see (one per sample)", dtype=None)
    z_t = tensor(z_t, x.shape, "the x_t the scores see")
    alpha, sigma = coefficients(t, z_t)
    return t, (z_t - alpha * x.detach().double()) / sigma


def dmd_defaults(f, n: int = 4096):
    """Call the loss without t and eps; return the t the real score saw, and the eps recovered from its x_t."""
    x = WIDE.sample(n, torch.Generator().manual_seed(74))[0].requires_grad_(True)
    real = LinearScore(0.5, 0.0)
    call(f, x, real, LinearScore(0.6, 0.0), torch.zeros(n, dtype=torch.long))
    if not real.calls:
        raise Fail("the real score was never called")
    return recorded_noise(real, x)


@check("dmd_generator_loss", "without t: t ~ U[DM_T_MIN, DM_T_MAX] = U[0.02, 0.98], one per sample (range, mean and "
       "spread of 4096 draws)")
def _(f):
    return uniform_times(dmd_defaults(f)[0], 4096, 0.02, 0.98, "t")


@check("dmd_generator_loss", "without eps: eps ~ N(0, I), fresh for every entry (mean, std and tails of the eps in "
       "x_t = alpha_t x + sigma_t eps)")
def _(f):
    return standard_normal(dmd_defaults(f)[1], "eps")


@check("dmd_generator_loss", "no gradient reaches the scores' parameters also where the fake score differs from the "
       "real one (where a leak is not multiplied by zero)")
def _(f):
    scores_after_backward(f, 0.1, 75)
    return "no gradient into the scores"


@check("dmd_generator_loss", "without t and eps, on image-shaped x (B, 3, 4, 4): eps fresh for every entry (entries "
       "uncorrelated) and for every call (two calls draw different t and eps: no fixed seed inside)")
def _(f):
    x = IMAGES.sample(4096, torch.Generator().manual_seed(76))[0].requires_grad_(True)
    real, labels = LinearScore(0.5, 0.0), torch.zeros(4096, dtype=torch.long)
    for _ in range(2):
        call(f, x, real, LinearScore(0.6, 0.0), labels)
    if len(real.calls) < 2:
        raise Fail(f"two calls made {len(real.calls)} calls of the real score, expected one each")
    (t1, eps1), (t2, eps2) = recorded_noise(real, x, 0), recorded_noise(real, x, -1)
    return "; ".join([standard_normal(eps1, "eps"), independent(eps1, "eps"), fresh(t1, t2, "t"),
                      fresh(eps1, eps2, "eps")])


@check("dmd_generator_loss", "in use: a DMD update of a generator G(z) = a z + b on (B, 3, 4, 4) samples: the "
       "gradient that reaches a and b through your loss is DMD's")
def _(f):
    g = torch.Generator().manual_seed(77)
    z, labels = torch.randn(64, 3, 4, 4, generator=g), torch.zeros(64, dtype=torch.long)
    t, eps = 0.05 + 0.9 * torch.rand(64, generator=g), torch.randn(64, 3, 4, 4, generator=g)
    real, fake = LinearScore(0.5, 0.0), LinearScore(0.8, 0.1)
    loss, a, b = dmd_update(lambda x, r, fk, c, t, eps: scalar_loss(call(f, x, r, fk, c, t=t, eps=eps)),
                            z, real, fake, labels, t, eps)
    if not loss.requires_grad:
        raise Fail("the loss has no gradient in the generator's parameters (requires_grad is False)")
    call(loss.backward)
    expected = torch.stack(dmd_update_expected(z, real, fake, labels, t, eps))
    got = torch.stack([p.grad if p.grad is not None else torch.zeros(()) for p in (a, b)])
    return close(expected, got, "(d loss / d a, d loss / d b)", 1e-7, 1e-3)


def fake_score_case(f, n: int = 2048):
    fake = TinyScore()
    g = torch.Generator().manual_seed(80)
    x, labels = MIX.sample(n, g)
    x.requires_grad_(True)
    loss = scalar_loss(call(f, fake, x, labels))
    if not fake.calls:
        raise Fail("fake_score.predict_v was never called: Alg. 1's loss compares v_hat with v")
    z_t, t, seen = fake.calls[-1]
    if tuple(t.shape) != (n,):
        raise Fail(f"the fake score saw t of shape {tuple(t.shape)}, expected one time per sample ({n},)")
    return fake, x, labels, loss, z_t, t, seen


@check("fake_score_loss", "Alg. 1's loss: the mean over the batch of mean (v_hat - v)^2, v = alpha_t eps - sigma_t x, "
       "v_hat = fake_score.predict_v(z_t, t, labels), recomputed from the recorded call")
def _(f):
    fake, x, labels, loss, z_t, t, seen = fake_score_case(f)
    alpha, sigma = coefficients(t, z_t)
    v = (alpha * z_t.double() - x.detach().double()) / sigma  # = alpha eps - sigma x, from z_t = alpha x + sigma eps
    with torch.no_grad():
        v_hat = fake.body(torch.cat([z_t, t[:, None], fake.embed(seen)], 1)).double()
    return close(((v_hat - v) ** 2).mean(), loss, "the loss", 1e-5, 1e-3)


@check("fake_score_loss", "t ~ U[0, 1] one per sample (range, mean, spread of 2048 draws) and eps ~ N(0, I)")
def _(f):
    _, x, _, _, z_t, t, _ = fake_score_case(f)
    alpha, sigma = coefficients(t, z_t)
    eps = (z_t.double() - alpha * x.detach().double()) / sigma
    return uniform_times(t, 2048, 0.0, 1.0, "t") + ", " + standard_normal(eps[t > 0.05], "eps")


@check("fake_score_loss", "the fake score sees the given class labels")
def _(f):
    _, _, labels, _, _, _, seen = fake_score_case(f)
    if not torch.equal(seen, labels):
        raise Fail(f"the fake score saw labels {seen[:6].tolist()}..., expected the given {labels[:6].tolist()}...")
    return "the given labels"


@check("fake_score_loss", "no gradient reaches the generator's samples x (detached), and the fake score's "
       "parameters get one")
def _(f):
    fake, x, _, loss, *_ = fake_score_case(f, 256)
    if not loss.requires_grad:
        raise Fail("the loss has no gradient at all (requires_grad is False): the fake score cannot learn")
    grads = call(torch.autograd.grad, loss, [x, *fake.parameters()], allow_unused=True)
    into_x = 0.0 if grads[0] is None else grads[0].abs().max().item()
    if into_x != 0:
        raise Fail(f"|d loss / d x| = {into_x:.2g}: detach the generator's samples")
    if not any(g is not None and g.abs().sum() > 0 for g in grads[1:]):
        raise Fail("the fake score's parameters get no gradient")
    return "x detached, parameters learn"


@check("fake_score_loss", "t and eps fresh for every entry and every call: the coordinates of eps uncorrelated, and "
       "two calls draw different t and eps (no fixed seed inside)")
def _(f):
    fake, x, labels, _, _, t1, _ = fake_score_case(f, 4096)
    call(f, fake, x, labels)
    t1, eps1 = recorded_noise(fake, x, 0)
    t2, eps2 = recorded_noise(fake, x, -1)
    keep = (t1 > 0.05) & (t2 > 0.05)  # where eps is well recovered from x_t
    return "; ".join([independent(eps1[keep], "eps"), fresh(t1, t2, "t"), fresh(eps1[keep], eps2[keep], "eps")])


@check("fake_score_loss", "in use: the fake score's update on a generator's image-shaped samples x = G(z) (B, 3, 4, "
       "4): no gradient reaches G, and the fake score's is that of Alg. 1's loss at the t and eps it saw")
def _(f):
    g = torch.Generator().manual_seed(81)
    z, labels = torch.randn(1024, 3, 4, 4, generator=g), torch.randint(8, (1024,), generator=g)
    scale, fake = torch.tensor(0.8, requires_grad=True), PixelScore()
    x = scale * z + 0.1
    loss = scalar_loss(call(f, fake, x, labels))
    if not fake.calls:
        raise Fail("fake_score.predict_v was never called: Alg. 1's loss compares v_hat with v")
    if not loss.requires_grad:
        raise Fail("the loss has no gradient at all (requires_grad is False): the fake score cannot learn")
    call(loss.backward)
    if scale.grad is not None and scale.grad.abs().item() > 0:
        raise Fail(f"d loss / d G's weights = {scale.grad.item():.2g}: detach the generator's samples")
    z_t, t, seen = fake.calls[-1]
    t = tensor(t, (1024,), "the t the fake score sees", dtype=None).float()
    alpha, sigma = coefficients(t, z_t)
    v = ((alpha * z_t.double() - x.detach().double()) / sigma).float()
    got = torch.stack([p.grad if p.grad is not None else torch.zeros_like(p) for p in (fake.a, fake.b)])
    fake.zero_grad()
    ((fake.predict_v(z_t, t, seen) - v) ** 2).mean().backward()
    return close(torch.stack([fake.a.grad, fake.b.grad]), got, "the fake score's gradient (d/da, d/db)", 1e-5, 1e-3)



def generate_run(f, steps: int, n: int = 20_000, first=None):
    z = randn(n, 2, seed=90)
    labels = torch.randint(8, (n,), generator=torch.Generator().manual_seed(91))
    generator = Generator()
    out = call(f, generator, z, labels, steps) if first is None else call(f, generator, z, labels, steps, first=first)
    return generator, z, labels, out


def latent_and_time(out, k: int, shape) -> tuple[torch.Tensor, float]:
    """What `generate(..., first=k)` returned, (z_t_k, t_k): the latent as a float64 tensor and t_k as a number
    (a float or a one-element tensor), or a Fail saying why not."""
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        raise Fail(f"with first = {k} it should return (z_t, t_k), got a {type(out).__name__}")
    z_k, t_k = tensor(out[0], shape, f"z_t_{k}"), out[1]
    if isinstance(t_k, torch.Tensor) and t_k.numel() == 1:
        t_k = t_k.item()
    if isinstance(t_k, bool) or not isinstance(t_k, (int, float)):
        shown = tuple(t_k.shape) if isinstance(t_k, torch.Tensor) else type(t_k).__name__
        raise Fail(f"with first = {k}, t_k should be a number (a float), got {shown}")
    return z_k, float(t_k)


def recovered_noise(generator, k: int, z_next: torch.Tensor, t_next: float) -> torch.Tensor:
    """eps_k from z_{t_k+1} = alpha x_k + sigma eps_k, x_k the generator's k-th prediction."""
    alpha, sigma = schedule(t_next)
    return (z_next.double() - alpha * generator.outputs[k].double()) / sigma


@check("generate", "K = 4: the generator is called at t = 1, 0.75, 0.5, 0.25 (t a (B,) tensor) with the given "
       "labels; K = 1: once, at t = 1")
def _(f):
    for steps, expected in ((4, [1.0, 0.75, 0.5, 0.25]), (1, [1.0])):
        generator, z, labels, _ = generate_run(f, steps, 256)
        if not all(tuple(t.shape) == (256,) for t, _, _ in generator.calls):
            raise Fail("the generator should get t as a (B,) tensor, one time per sample")
        times = [round(t[0].item(), 4) for t, _, _ in generator.calls]
        if times != expected:
            raise Fail(f"K = {steps}: the generator was called at t = {times}, expected {expected}")
        if not all(torch.equal(c, labels) for _, _, c in generator.calls):
            raise Fail("the generator was not called with the given labels")
    return "times and labels"


@check("generate", "the first call sees the noise z itself, and the sample returned is the last x prediction "
       "(K = 1 and 4)")
def _(f):
    for steps in (1, 4):
        generator, z, _, out = generate_run(f, steps, 256)
        if not generator.calls or not torch.equal(generator.calls[0][1], z):
            raise Fail(f"K = {steps}: the first call did not get z")
        close(generator.outputs[-1], out, f"K = {steps}: the sample", 0)
    return "z in, the last x out"


@check("generate", "re-noising to the next time: z = alpha_next x + sigma_next eps with eps ~ N(0, I), recovered "
       "at every step of K = 4 (mean, std and tails of 40000 draws)")
def _(f):
    generator, *_ = generate_run(f, 4)
    if len(generator.calls) != 4:
        raise Fail(f"K = 4 made {len(generator.calls)} generator calls, expected 4")
    details = []
    for k, t_next in enumerate((0.75, 0.5, 0.25)):
        eps = recovered_noise(generator, k, generator.calls[k + 1][1], t_next)
        details.append(standard_normal(eps, f"eps_{k}"))
    return "; ".join(details)


@check("generate", "fresh noise at every step: the eps recovered at the three re-noisings of K = 4 are uncorrelated "
       "with each other and with z (|correlation| < 0.05)")
def _(f):
    generator, z, _, _ = generate_run(f, 4)
    if len(generator.calls) != 4:
        raise Fail(f"K = 4 made {len(generator.calls)} generator calls, expected 4")
    noise = [recovered_noise(generator, k, generator.calls[k + 1][1], t) for k, t in enumerate((0.75, 0.5, 0.25))]
    pairs = [("eps_0", "eps_1", noise[0], noise[1]), ("eps_1", "eps_2", noise[1], noise[2]),
             ("eps_0", "eps_2", noise[0], noise[2]), ("eps_0", "z", noise[0], z), ("eps_2", "z", noise[2], z)]
    for a, b, u, v in pairs:
        c = correlation(u, v)
        if not abs(c) < 0.05:  # also NaN
            raise Fail(f"correlation({a}, {b}) = {c:.3f}: draw fresh noise (torch.randn_like) at every re-noising")
    return "uncorrelated"


@check("generate", "first = k: returns (z_t_k, t_k) after k generator calls: (z, 1.0) for k = 0; for k = 2 of K = 4 "
       "t = 0.5 and the latent the third call would see")
def _(f):
    generator, z, _, out = generate_run(f, 4, first=0)
    z_0, t_0 = latent_and_time(out, 0, z.shape)
    if generator.calls or not torch.equal(z_0, z.double()) or t_0 != 1.0:
        raise Fail(f"first = 0: expected (z, 1.0) and no generator call, got t = {t_0} after "
                   f"{len(generator.calls)} calls")
    generator, z, _, out = generate_run(f, 4, first=2)
    z_2, t_2 = latent_and_time(out, 2, z.shape)
    if len(generator.calls) != 2 or t_2 != 0.5:
        raise Fail(f"first = 2 of K = 4: expected t = 0.5 after 2 calls, got t = {t_2} after "
                   f"{len(generator.calls)} calls")
    return standard_normal(recovered_noise(generator, 1, z_2, 0.5), "eps_1")


@check("generate", "image-shaped z (B, 3, 4, 4), K = 4: the re-noising eps has z's shape, is N(0, I) and fresh for "
       "every entry (entries uncorrelated); two calls re-noise with different noise (no fixed seed inside)")
def _(f):
    z, labels = randn(4096, 3, 4, 4, seed=92), torch.zeros(4096, dtype=torch.long)
    noise = []
    for _ in range(2):
        generator = Generator()
        returned(call(f, generator, z, labels, 4), z.shape, "the sample")
        if len(generator.calls) != 4:
            raise Fail(f"K = 4 made {len(generator.calls)} generator calls, expected 4")
        noise.append(recovered_noise(generator, 0, tensor(generator.calls[1][1], z.shape, "z_t_1"), 0.75))
    return "; ".join([standard_normal(noise[0], "eps_0"), independent(noise[0], "eps_0"),
                      fresh(noise[0], noise[1], "eps_0")])


@check("generate", "in use: backward simulation: z_t_k from first = k, and the sample, carry no gradient from the "
       "generator's weights (@torch.no_grad), so the trained k-th step is the only one the update reaches")
def _(f):
    z, labels = randn(64, 3, 4, 4, seed=93), torch.zeros(64, dtype=torch.long)
    with torch.enable_grad():  # as in training
        generator = Generator()
        out = call(f, generator, z, labels, 4, first=2)
        latent_and_time(out, 2, z.shape)
        sample = call(f, generator, z, labels, 4)
    for what, value in (("z_t_k (first = 2)", out[0]), ("the sample", sample)):
        if isinstance(value, torch.Tensor) and value.requires_grad:
            raise Fail(f"{what} carries a gradient from the generator's weights: the first k steps run without "
                       "gradient (@torch.no_grad()), or training backpropagates through all of them")
    return "no gradient through the earlier steps"


# ----------------------------------------------------------------------------------------
# DMD2's GAN losses
# ----------------------------------------------------------------------------------------


def moderate_logits(seed: int, n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits in [-6, 6], where the by-hand log-sigmoid is exact in float64 (real ones mostly positive)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, generator=g) * 8 - 2), (torch.rand(n, generator=g) * 8 - 6)


@check("gan_classifier_loss", "-mean log D(real) - mean log(1 - D(fake)), D = sigmoid(logit): both terms averaged "
       "over the batch, no weight, no factor 1/2")
def _(f):
    real, fake = moderate_logits(90)
    return close(by_hand_gan_losses(real, fake)[0], scalar_loss(call(f, real, fake)), "the loss", 1e-6, 1e-5)


@check("gan_classifier_loss", "which side is which: about 0 for a classifier that is right (real +20, fake -20), "
       "about 40 when it is fooled (real -20, fake +20)")
def _(f):
    sure = torch.full((16,), 20.0)
    right, fooled = scalar_loss(call(f, sure, -sure)).item(), scalar_loss(call(f, -sure, sure)).item()
    if not (right < 1e-6 and abs(fooled - 40.0) < 1e-3):
        raise Fail(f"right: {right:.4g} (expected ~0), fooled: {fooled:.4g} (expected ~40): real logits should be "
                   "pushed up, fake ones down")
    return f"right {right:.2g}, fooled {fooled:.4g}"


@check("gan_classifier_loss", "finite and right at logits of +-100 (log(sigmoid) in one piece: softplus)")
def _(f):
    far = torch.tensor([100.0, -100.0])
    return close(torch.tensor(100.0, dtype=torch.float64), scalar_loss(call(f, -far.flip(0), far)),
                 "the loss at logits real (-100, 100), fake (100, -100) (expected 50 + 50)", 1e-3)


@check("gan_classifier_loss", "in use: the classifier's update: d loss / d logit is -(1 - D(real)) / B on the real "
       "logits and D(fake) / B on the fake ones")
def _(f):
    real, fake = moderate_logits(92)
    real.requires_grad_(True)
    fake.requires_grad_(True)
    loss = scalar_loss(call(f, real, fake))
    if not loss.requires_grad:
        raise Fail("the loss has no gradient in the logits (requires_grad is False)")
    got = call(torch.autograd.grad, loss, [real, fake], allow_unused=True)
    got = torch.cat([torch.zeros_like(v) if g is None else g for v, g in zip((real, fake), got)])
    d_real, d_fake = torch.sigmoid(real.detach().double()), torch.sigmoid(fake.detach().double())
    expected = torch.cat([-(1 - d_real) / len(real), d_fake / len(fake)])
    return close(expected, got, "d loss / d logit (real, then fake)", 1e-7, 1e-4)


@check("gan_generator_loss", "non-saturating: -mean log D(fake) = mean softplus(-logit), not mean log(1 - D(fake))")
def _(f):
    _, fake = moderate_logits(91)
    return close(by_hand_gan_losses(fake, fake)[1], scalar_loss(call(f, fake)), "the loss", 1e-6, 1e-5)


@check("gan_generator_loss", "the gradient is -sigmoid(-logit) / B per sample: about -1/B where the classifier is "
       "sure a sample is fake (logit -10; the saturating form gives about -5e-5/B), -0.5/B at logit 0, at 3 "
       "-0.047/B")
def _(f):
    logits = torch.tensor([-10.0, -10.0, 0.0, 3.0], requires_grad=True)
    grad = tensor(gradient(call(f, logits), logits), (4,), "d loss / d logit")
    expected = -torch.sigmoid(-logits.detach().double()) / 4
    for i, logit in enumerate(logits.tolist()):
        close(expected[i:i + 1], grad[i:i + 1].float(), f"d loss / d logit at logit {logit:g} (B = 4)", 1e-6, 1e-4)
    return close(expected, grad.float(), "d loss / d logit at logits -10, -10, 0, 3", 1e-6, 1e-4)


@check("gan_generator_loss", "finite at a logit of -100 (softplus, not log(sigmoid))")
def _(f):
    return close(torch.tensor(100.0, dtype=torch.float64), scalar_loss(call(f, torch.tensor([-100.0]))),
                 "the loss at logit -100", 1e-3)


# ----------------------------------------------------------------------------------------
# DisBack
# ----------------------------------------------------------------------------------------


def schedule_of(f, n: int, interval: int, updates: int, expected: list) -> str:
    got = [call(f, step, n, interval) for step in range(updates)]
    if not all(type(j) is int for j in got) or got != expected:  # an int, not a bool or a subclass
        raise Fail(f"N = {n}, interval {interval}: got {got}, expected {expected} (ints)")
    return f"N = {n}: {got}"


@check("snapshot_index", "N = 5, interval 3: s'_4 for three updates, then s'_3, ..., then the teacher s'_0 for good")
def _(f):
    return schedule_of(f, 5, 3, 18, [4, 4, 4, 3, 3, 3, 2, 2, 2, 1, 1, 1, 0, 0, 0, 0, 0, 0])


@check("snapshot_index", "N = 2, interval 4: 1 four times, then 0; N = 1: the teacher from the start")
def _(f):
    return schedule_of(f, 2, 4, 10, [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]) + "; " + schedule_of(f, 1, 2, 5, [0] * 5)


@check("snapshot_index", "interval 1, N = 3: 2, 1, 0, 0, ... over 40 updates")
def _(f):
    return schedule_of(f, 3, 1, 40, [2, 1] + [0] * 38)


@check("snapshot_index", "N = 0 (disback.py --snapshots 0, plain DMD): the teacher, 0, at every update")
def _(f):
    return schedule_of(f, 0, 3, 10, [0] * 10)


@check("snapshot_index", "in use: DisBack's path for N = 0 to 6 snapshots and intervals 1 to 4: the snapshot of every "
       "update, and the teacher reached at update max(N - 1, 0) * interval as disback.py records")
def _(f):
    for n in range(7):
        for interval in range(1, 5):
            updates = (n + 1) * interval + 3
            expected = disback_path(lambda step, n, k: max(n - 1 - step // k, 0), n, interval, updates)
            got = disback_path(lambda step, n, k: call(f, step, n, k), n, interval, updates)
            if got != expected:
                raise Fail(f"N = {n}, interval {interval}: the path uses snapshots {got[0]} and reaches the teacher "
                           f"at update {got[1]}, expected {expected[0]} and {expected[1]}")
    return "every path"


# torch replaces some of its own functions when torch._dynamo is first imported (torch.manual_seed becomes a
# wrapper), which may happen later in the same process (torch.compile): import it first, so that it is not taken
# for the student's doing.
importlib.import_module("torch._dynamo")
TRUSTED.update(trusted())  # before any student code runs: checks.py is imported before it is loaded
