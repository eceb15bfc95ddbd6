"""The checks: a fixed list for every exercise, each grading one thing the function must get right.

A check is a function of the student's function that returns what it measured (shown in the report)
or raises Fail with what came back and what was expected; `@check(name, what)` registers it in
CHECKS[name], in the order it runs and is reported. The expected answers come from the checker's own
closed forms (closed_forms.py); check.py runs the checks, scores them and reports.

Above the checks: the outcomes (Fail, Crash, Stub), `call`, which runs the student's code and turns an
exception raised there into a Crash that names their line, and the measuring helpers (`close` entry by
entry, `standard_normal`, `uniform_times` and `correlation` for what is drawn at random).
"""

from __future__ import annotations

import math
import traceback
from pathlib import Path

import torch

from exercises.closed_forms import (MIX, WIDE, Generator, LinearScore, Teacher, TinyScore, WrongCall, by_hand_cfg,
                                    by_hand_ddim_step, by_hand_diffuse, by_hand_gan_losses, by_hand_invert_ddim,
                                    by_hand_renoise, coefficients, dmd_expected, schedule, snr, two_teacher_steps)

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


def call(f, *args, **kwargs):
    """f(*args, **kwargs), with an exception in the student's code turned into a Crash (or a Stub)."""
    try:
        return f(*args, **kwargs)
    except (Fail, Stub, Crash):
        raise
    except WrongCall as e:  # a stand-in called the wrong way (the teacher with a guessed null label): a verdict
        raise Fail(str(e)) from None
    except NotImplementedError as e:
        if str(e).startswith("not implemented yet") and f"write {CURRENT['name']} " in str(e):
            raise Stub(str(e)) from None
        raise Crash(f"NotImplementedError: {e}{where(e, student_files())}") from None
    except Exception as e:  # noqa: BLE001 - the student's bug, reported with its line
        raise Crash(f"{type(e).__name__}: {e}{where(e, student_files())}") from None


def student_files() -> set[str]:
    """Files whose lines are the student's: the graded function's file (for the reference, its module), and the
    other files beside the checker (the exercises, the handout's toolkit.py), never the checker's own."""
    return {CURRENT["file"]} | {str(p) for p in HERE.glob("*.py") if p.name not in CHECKER_FILES}


def checker_files() -> set[str]:
    return {str(HERE / name) for name in CHECKER_FILES}


# ----------------------------------------------------------------------------------------
# Measuring what came back
# ----------------------------------------------------------------------------------------


def tensor(got, shape: tuple, what: str) -> torch.Tensor:
    """The student's return value as a float64 tensor of the expected shape, or a Fail saying why not."""
    if not isinstance(got, torch.Tensor):
        raise Fail(f"{what} should be a tensor of shape {tuple(shape)}, got a {type(got).__name__}")
    if tuple(got.shape) != tuple(shape):
        raise Fail(f"{what} should have shape {tuple(shape)}, got {tuple(got.shape)}")
    return got.detach().double()


def close(expected: torch.Tensor, got: torch.Tensor, what: str, atol: float, rtol: float = 0.0) -> str:
    """Entry by entry |got - expected| <= atol + rtol |expected|, or a Fail naming the worst entry."""
    expected = torch.as_tensor(expected, dtype=torch.float64)
    got = tensor(got, expected.shape, what)
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
    """`name = value` or a Fail if the value is outside [lo, hi]."""
    if not lo <= value <= hi:
        raise Fail(f"{name} = {value:.4g}, expected in [{lo:.4g}, {hi:.4g}]")
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
    """One time per sample, drawn from U[lo, hi]: the range, the mean and the spread of n draws."""
    t = tensor(t, (n,), what)
    width, se = hi - lo, (hi - lo) / math.sqrt(12 * n)
    return ", ".join([statistic(f"min of {what}", t.min().item(), lo, lo + 0.01 * width),
                      statistic(f"max of {what}", t.max().item(), hi - 0.01 * width, hi),
                      statistic(f"mean of {what}", t.mean().item(), (lo + hi) / 2 - 6 * se, (lo + hi) / 2 + 6 * se),
                      statistic(f"std of {what}", t.std().item(), width / math.sqrt(12) * 0.95,
                                width / math.sqrt(12) * 1.05)])


def scalar_loss(loss) -> torch.Tensor:
    """The loss, or a Fail if it is not a 0-d tensor."""
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise Fail(f"the loss should be a scalar tensor (a mean), got {shape}")
    return loss


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
    return tensor(got[0], shape, "alpha_t"), tensor(got[1], shape, "sigma_t")


@check("alpha_sigma", "alpha_t = cos(pi t / 2) and sigma_t = sin(pi t / 2), entry by entry, at 101 times in [0, 1]")
def _(f):
    t = torch.linspace(0, 1, 101)
    alpha, sigma = pair(call(f, t), (101,), "alpha_sigma(t)")
    a, s = schedule(t)
    return close(a, alpha, "alpha_t", 1e-6) + "; " + close(s, sigma, "sigma_t", 1e-6)


@check("alpha_sigma", "a float t gives two 0-d tensors, a (3, 4) tensor of times two (3, 4) tensors")
def _(f):
    alpha, sigma = pair(call(f, 0.3), (), "alpha_sigma(0.3)")
    close(schedule(0.3)[0], alpha, "alpha_0.3", 1e-6)
    t = torch.rand(3, 4, generator=torch.Generator().manual_seed(0))
    alpha, sigma = pair(call(f, t), (3, 4), "alpha_sigma of a (3, 4) tensor")
    return close(schedule(t)[0], alpha, "alpha_t", 1e-6) + "; " + close(schedule(t)[1], sigma, "sigma_t", 1e-6)


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


# ----------------------------------------------------------------------------------------
# progressive distillation
# ----------------------------------------------------------------------------------------


def pd_case(f, i, n: int, seed: int):
    x, labels, eps = data(512, seed)
    t = torch.as_tensor(i, dtype=torch.float32).expand(512) / n
    z_t = by_hand_diffuse(x, t, eps)
    return close(two_teacher_steps(z_t, t, labels, n), call(f, Teacher(), z_t, t, labels, n), "x_tilde", 1e-4, 1e-4)


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


@check("dmd_generator_loss", "the gradient is exactly 0 when the fake score equals the real one, and no gradient "
       "reaches the scores' parameters")
def _(f):
    g = torch.Generator().manual_seed(73)
    x = torch.randn(64, 2, generator=g).requires_grad_(True)
    real, fake = LinearScore(0.5, 0.0), LinearScore(0.5, 0.0)
    loss = call(f, x, real, fake, torch.zeros(64, dtype=torch.long), t=torch.full((64,), 0.5),
                eps=torch.randn(64, 2, generator=g))
    if scalar_loss(loss).requires_grad:
        call(loss.backward)
    grad = torch.zeros_like(x) if x.grad is None else x.grad
    touched = [p for p in [*real.parameters(), *fake.parameters()] if p.grad is not None and p.grad.abs().sum() > 0]
    if touched:
        raise Fail("the scores' parameters got a gradient: compute both scores without gradient (no_grad_fp32)")
    return close(torch.zeros_like(grad), grad, "gradient", 0)


def dmd_defaults(f, n: int = 4096):
    """Call the loss without t and eps; return x, the recorded t, and the eps recovered from the recorded z_t."""
    x = WIDE.sample(n, torch.Generator().manual_seed(74))[0].requires_grad_(True)
    real = LinearScore(0.5, 0.0)
    call(f, x, real, LinearScore(0.6, 0.0), torch.zeros(n, dtype=torch.long))
    if not real.calls:
        raise Fail("the real score was never called")
    z_t, t, _ = real.calls[0]
    t = tensor(t, (n,), "the t the scores see (one per sample)")
    z_t = tensor(z_t, (n, 2), "the x_t the scores see")
    alpha, sigma = coefficients(t, z_t)
    return t, (z_t - alpha * x.detach().double()) / sigma


@check("dmd_generator_loss", "without t: t ~ U[DM_T_MIN, DM_T_MAX] = U[0.02, 0.98], one per sample (range, mean and "
       "spread of 4096 draws)")
def _(f):
    return uniform_times(dmd_defaults(f)[0], 4096, 0.02, 0.98, "t")


@check("dmd_generator_loss", "without eps: eps ~ N(0, I), fresh for every entry (mean, std and tails of the eps in "
       "x_t = alpha_t x + sigma_t eps)")
def _(f):
    return standard_normal(dmd_defaults(f)[1], "eps")


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


@check("gan_generator_loss", "non-saturating: -mean log D(fake) = mean softplus(-logit), not mean log(1 - D(fake))")
def _(f):
    _, fake = moderate_logits(91)
    return close(by_hand_gan_losses(fake, fake)[1], scalar_loss(call(f, fake)), "the loss", 1e-6, 1e-5)


@check("gan_generator_loss", "where the classifier is sure a sample is fake (logit -10) the gradient is about -1/B "
       "per sample, raising the logit (the saturating form gives about -5e-5/B)")
def _(f):
    logits = torch.tensor([-10.0, -10.0, 0.0, 3.0], requires_grad=True)
    grad = gradient(call(f, logits), logits)
    expected = -torch.sigmoid(-logits.detach().double()) / 4
    return close(expected, grad, "d loss / d logit", 1e-6, 1e-4)


@check("gan_generator_loss", "finite at a logit of -100 (softplus, not log(sigmoid))")
def _(f):
    return close(torch.tensor(100.0, dtype=torch.float64), scalar_loss(call(f, torch.tensor([-100.0]))),
                 "the loss at logit -100", 1e-3)


# ----------------------------------------------------------------------------------------
# DisBack
# ----------------------------------------------------------------------------------------


def schedule_of(f, n: int, interval: int, updates: int, expected: list) -> str:
    got = [call(f, step, n, interval) for step in range(updates)]
    if not all(isinstance(j, int) and not isinstance(j, bool) for j in got) or got != expected:
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

