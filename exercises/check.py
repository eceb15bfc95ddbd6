"""Check the exercises: each function against closed-form answers, in seconds on a CPU.

    python exercises/check.py                 # every topic, from your files in exercises/
    python exercises/check.py basics dmd      # some topics
    python exercises/check.py --reference     # the repository's own code (every check passes)

For every check it prints what was expected and what came back; it exits 1 if any check fails.
The checks use no reference implementation of the function under test: identities, the exact
denoiser of a Gaussian mixture (a perfect teacher), autograd, and known schedules.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from common import diffuse, diffusion_loss  # noqa: E402
from exercises.make import TOPICS  # noqa: E402
from plumbing.data import GaussianMixture, gaussians8  # noqa: E402
from plumbing.networks import MLPDenoiserNet  # noqa: E402

MIX = gaussians8()  # 8 Gaussians on the unit circle; MIX.denoiser is the exact E[x | z_t, c]
NULL = MIX.num_classes


def cos_sin(t: float) -> tuple[float, float]:
    return math.cos(math.pi * t / 2), math.sin(math.pi * t / 2)


def err(a, b) -> float:
    return (torch.as_tensor(a, dtype=torch.float64) - torch.as_tensor(b, dtype=torch.float64)).abs().max().item()


def close(what: str, expected, got, tol: float):
    """(description, passed, detail) for a comparison of tensors or numbers."""
    e = err(expected, got)
    return what, e <= tol, f"max error {e:.2g} (allowed {tol:.0g})"


def ddim_by_hand(x_hat, z_t, t: float, s: float):
    """The DDIM step written out for scalar times: alpha_s x_hat + sigma_s (z_t - alpha_t x_hat) / sigma_t."""
    (a_t, s_t), (a_s, s_s) = cos_sin(t), cos_sin(s)
    return a_s * x_hat + s_s * (z_t - a_t * x_hat) / s_t


def data(n: int = 512, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x, labels = MIX.sample(n, g)
    return x, labels, torch.randn(n, 2, generator=g)


# ----------------------------------------------------------------------------------------
# basics
# ----------------------------------------------------------------------------------------


def check_alpha_sigma(f):
    t = torch.linspace(0, 1, 101)
    alpha_t, sigma_t = f(t)
    yield close("alpha_t^2 + sigma_t^2 = 1 on 101 times in [0, 1] (variance preserving)",
                torch.ones(101), alpha_t**2 + sigma_t**2, 1e-5)
    got = tuple(float(v) for v in f(0.3))
    yield close(f"alpha_0.3 = cos(0.15 pi), sigma_0.3 = sin(0.15 pi): expected {cos_sin(0.3)}, got {got}",
                cos_sin(0.3), got, 1e-6)
    a1, a0, s0 = float(f(1.0)[0]), float(f(0.0)[0]), float(f(0.0)[1])
    yield (f"alpha_1 = 0 exactly (pure noise), alpha_0 = 1, sigma_0 = 0: got {a1:.3g}, {a0:.3g}, {s0:.3g}",
           a1 == 0.0 and a0 == 1.0 and s0 == 0.0, "")


def check_ddim_step(f):
    x, _, eps = data()
    for t, s in ((0.7, 0.4), (1.0, 0.5), (0.3, 0.0)):
        (a_t, s_t), (a_s, s_s) = cos_sin(t), cos_sin(s)
        z_t = a_t * x + s_t * eps
        # given the true x, a deterministic step keeps the same eps: z_s = alpha_s x + sigma_s eps
        yield close(f"from z_t = alpha_t x + sigma_t eps with x_hat = x, a step {t} -> {s} lands on "
                    "alpha_s x + sigma_s eps", a_s * x + s_s * eps, f(x, z_t, t, s), 1e-5)
    z_t, x_hat = torch.randn(512, 2), torch.randn(512, 2)
    t = torch.full((512,), 0.6)
    yield close("per-example times t (B,) give the same step as a float", f(x_hat, z_t, 0.6, 0.2),
                f(x_hat, z_t, t, torch.full((512,), 0.2)), 1e-6)


def check_invert_ddim(f):
    g = torch.Generator().manual_seed(1)
    z_t, z_s = torch.randn(512, 2, generator=g), torch.randn(512, 2, generator=g)
    for t, s in ((0.8, 0.55), (1.0, 0.75), (0.25, 0.0)):
        x_tilde = f(z_t, z_s, t, s)
        where = " (alpha_t = 0)" if t == 1.0 else " (s = 0)" if s == 0.0 else ""
        yield close(f"one DDIM step {t} -> {s} from z_t with x_tilde lands on z_s{where}",
                    z_s, ddim_by_hand(x_tilde, z_t, t, s), 1e-4)


def check_cfg(f):
    g = torch.Generator().manual_seed(2)
    x_c, x_u = torch.randn(64, 2, generator=g), torch.randn(64, 2, generator=g)
    yield close("w = 2: (1 + w) x_cond - w x_uncond = 3 x_cond - 2 x_uncond", 3 * x_c - 2 * x_u, f(x_c, x_u, 2.0), 1e-5)
    yield close("w = 0 is the conditional model", x_c, f(x_c, x_u, 0.0), 1e-6)
    w = torch.linspace(0, 4, 64)
    yield close("per-example w (B,)", (1 + w[:, None]) * x_c - w[:, None] * x_u, f(x_c, x_u, w), 1e-5)


# ----------------------------------------------------------------------------------------
# progressive distillation
# ----------------------------------------------------------------------------------------


def check_pd_target(f):
    teacher, n = MIX.denoiser, 8  # the exact denoiser: a perfect teacher
    x, labels, eps = data()
    for i in (n, 5, 1):
        t_val, t1, t2 = i / n, (i - 0.5) / n, (i - 1) / n
        t = torch.full((512,), t_val)
        z_t = diffuse(x, t, eps)
        z_mid = ddim_by_hand(teacher(z_t, t, labels), z_t, t_val, t1)
        z_two = ddim_by_hand(teacher(z_mid, torch.full((512,), t1), labels), z_mid, t1, t2) if t2 > 0 \
            else teacher(z_mid, torch.full((512,), t1), labels)
        x_tilde = f(teacher, z_t, t, labels, n)
        landed = ddim_by_hand(x_tilde, z_t, t_val, t2) if t2 > 0 else x_tilde
        note = " (alpha_t = 0)" if i == n else " (t'' = 0: the target is the teacher's second x_hat)" if i == 1 else ""
        yield close(f"N = {n}, t = {i}/{n}: one student step from z_t lands on the teacher's two{note}",
                    z_two, landed, 1e-4)


def check_snr_weight(f):
    t = torch.linspace(0.02, 0.98, 49)
    snr = (torch.cos(math.pi * t / 2) / torch.sin(math.pi * t / 2)) ** 2
    yield close("truncated-snr = max(SNR, 1) (compared as the ratio to it)", torch.ones(49),
                f(t, "truncated-snr") / snr.clamp(min=1), 1e-4)
    yield close("snr+1 = SNR + 1 (compared as the ratio to it)", torch.ones(49), f(t, "snr+1") / (snr + 1), 1e-4)
    try:
        f(t, "snr-squared")
        yield "an unknown weighting is an error", False, "it returned a value"
    except NotImplementedError:
        raise
    except Exception as e:  # noqa: BLE001 - any clear error will do
        yield "an unknown weighting is an error", True, type(e).__name__


# ----------------------------------------------------------------------------------------
# guided distillation
# ----------------------------------------------------------------------------------------


class ExactTeacher:
    """The exact mixture denoiser behind the Denoiser protocol, with a null label."""

    null_label = NULL

    def __call__(self, z_t, t, labels, w=None):
        return MIX.denoiser(z_t, t, labels)


def check_guided_target(f):
    x, labels, eps = data()
    t = torch.full((512,), 0.4)
    z_t = diffuse(x, t, eps)
    cond, uncond = MIX.denoiser(z_t, t, labels), MIX.denoiser(z_t, t, torch.full_like(labels, NULL))
    for w in (0.0, 2.0):
        yield close(f"w = {w:g}: (1 + w) x_hat(z_t, c) - w x_hat(z_t, null) of the exact mixture",
                    (1 + w) * cond - w * uncond, f(ExactTeacher(), z_t, t, labels, w), 1e-5)


def check_renoise(f):
    g = torch.Generator().manual_seed(3)
    z_s = torch.randn(256, 2, generator=g)
    for s, t in ((0.25, 0.5), (0.0, 0.25), (0.5, 0.9)):
        (a_s, s_s), (a_t, s_t) = cos_sin(s), cos_sin(t)
        ratio, std = a_t / a_s, math.sqrt(s_t**2 - (a_t / a_s) ** 2 * s_s**2)
        yield close(f"{s} -> {t}, eps = 0: the mean (alpha_t / alpha_s) z_s", ratio * z_s,
                    f(z_s, s, t, torch.zeros_like(z_s)), 1e-5)
        yield close(f"{s} -> {t}, eps = 1: plus sigma_t|s = sqrt(sigma_t^2 - (alpha_t/alpha_s)^2 sigma_s^2) "
                    f"= {std:.4f}", ratio * z_s + std, f(z_s, s, t, torch.ones_like(z_s)), 1e-5)


# ----------------------------------------------------------------------------------------
# DMD
# ----------------------------------------------------------------------------------------


def check_dmd_generator_loss(f):
    wide = GaussianMixture(MIX.means, std=0.2)  # the generator's distribution: its exact denoiser is mu_fake
    g = torch.Generator().manual_seed(4)
    x = wide.sample(256, g)[0].requires_grad_(True)
    labels = torch.full((256,), NULL)
    t, eps = 0.05 + 0.9 * torch.rand(256, generator=g), torch.randn(256, 2, generator=g)
    (grad,) = torch.autograd.grad(f(x, MIX.denoiser, wide.denoiser, labels, t=t, eps=eps), x)
    x_t = diffuse(x.detach(), t, eps)
    mu_real, mu_fake = MIX.denoiser(x_t, t, labels), wide.denoiser(x_t, t, labels)
    expected = (mu_fake - mu_real) / (x.detach() - mu_real).abs().mean(1, keepdim=True)
    yield close("the loss's gradient in x (times its numel) is (mu_fake - mu_real) / mean|x - mu_real|",
                expected, grad * x.numel(), 1e-4)
    (same,) = torch.autograd.grad(f(x, MIX.denoiser, MIX.denoiser, labels, t=t, eps=eps), x)
    yield close("the gradient is 0 when the fake score equals the real one", torch.zeros_like(same), same, 0)
    seen = []

    def recording(z_t, t, c):
        seen.append(t)
        return MIX.denoiser(z_t, t, c)

    f(x, recording, wide.denoiser, labels)
    t_drawn = seen[0]
    yield (f"without t, t ~ U[0.02, 0.98] per sample: drew {t_drawn.numel()} in "
           f"[{t_drawn.min():.3f}, {t_drawn.max():.3f}]",
           t_drawn.numel() == 256 and t_drawn.min() >= 0.02 and t_drawn.max() <= 0.98 and t_drawn.std() > 0.1, "")


def check_fake_score_loss(f):
    torch.manual_seed(5)
    from common import Denoiser

    fake = Denoiser(MLPDenoiserNet(NULL, hidden=32, depth=2))
    x, labels = MIX.sample(128)[0].requires_grad_(True), torch.full((128,), NULL)
    torch.manual_seed(6)
    loss = f(fake, x, labels)
    torch.manual_seed(6)
    yield close("Alg. 1's denoising loss of the fake score on the samples (same t and eps)",
                diffusion_loss(fake, x.detach(), labels), loss.detach(), 1e-6)
    grads = torch.autograd.grad(loss, [x, *fake.parameters()], allow_unused=True)
    into_x = 0.0 if grads[0] is None else grads[0].abs().max().item()
    yield ("no gradient reaches the generator's samples x (they are detached)", into_x == 0.0,
           f"|d loss / d x| = {into_x:.2g}")
    learns = any(g is not None and g.abs().sum() > 0 for g in grads[1:])
    yield "the fake score's parameters get a gradient", learns, ""


def check_generate(f):
    calls = []

    def recording_generator(z_t, t, labels):
        calls.append((t[0].item(), z_t.clone()))
        return torch.ones_like(z_t)  # always predicts x = 1

    torch.manual_seed(7)
    z, c = torch.randn(100_000, 2), torch.zeros(100_000, dtype=torch.long)
    x = f(recording_generator, z, c, 4)
    times = [t for t, _ in calls]
    yield f"K = 4: calls at t = 1, 0.75, 0.5, 0.25; got {times}", times == [1.0, 0.75, 0.5, 0.25], ""
    yield "the first call sees the pure noise z", bool(calls) and torch.equal(calls[0][1], z), ""
    yield "the sample is the last x prediction", torch.equal(x, torch.ones_like(z)), ""
    if len(calls) > 1:
        a = math.cos(math.pi * 0.75 / 2)
        yield close(f"step 1 starts from alpha x + sigma eps, x = 1: mean alpha_0.75 = {a:.3f}",
                    torch.full((2,), a), calls[1][1].mean(0), 0.02)
        first = calls[1][1]
        calls.clear()
        f(recording_generator, z, c, 4)
        fresh = len(calls) > 1 and not torch.equal(first, calls[1][1])
        yield "fresh noise at every re-noising (two runs differ)", fresh, ""
    calls.clear()
    z_k, t_k = f(recording_generator, z, c, 4, first=2)
    yield (f"first=2: stops before step 2 and returns its input z at t_2 = 0.5 (got t = {t_k})",
           t_k == 0.5 and len(calls) == 2 and z_k.shape == z.shape, "")


# ----------------------------------------------------------------------------------------
# DisBack
# ----------------------------------------------------------------------------------------


def check_snapshot_index(f):
    expected = [4, 4, 4, 3, 3, 3, 2, 2, 2, 1, 1, 1, 0, 0, 0, 0]
    got = [f(step, 5, 3) for step in range(16)]
    yield f"N = 5, interval 3: s'_4 three times, then s'_3, ..., then the teacher s'_0: got {got}", got == expected, ""
    got = [f(step, 0, 3) for step in range(5)]
    yield f"no snapshots: the teacher from the start: got {got}", got == [0] * 5, ""


CHECKS = {name: globals()[f"check_{name}"] for topic in TOPICS.values() for _, name in topic[1]}


# ----------------------------------------------------------------------------------------
# Running them
# ----------------------------------------------------------------------------------------


def run(name: str, function) -> list[tuple[str, bool, str]]:
    """Every check of one exercise; a stub or a crash is one failed check, never a traceback."""
    results = []
    try:
        for result in CHECKS[name](function):
            results.append(result)
    except NotImplementedError as e:  # the untouched stub
        results.append((str(e), False, ""))
    except Exception as e:  # noqa: BLE001 - a student's bug is a failed check with its message
        results.append((f"{name} raised {type(e).__name__}: {e}", False, ""))
    return results


def implementations(topic: str, reference: bool):
    """{function: the student's (exercises/<topic>.py) or the repository's implementation}."""
    functions = TOPICS[topic][1]
    if reference:
        return {name: getattr(importlib.import_module(module), name) for module, name in functions}
    path = HERE / f"{topic}.py"
    spec = importlib.util.spec_from_file_location(f"exercise_{topic}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return {name: getattr(module, name) for _, name in functions}


def check_topic(topic: str, impl: dict) -> list[tuple[str, str, bool, str]]:
    return [(name, *r) for name, function in impl.items() for r in run(name, function)]


def main(argv: list[str]) -> int:
    reference = "--reference" in argv
    topics = [a for a in argv if not a.startswith("--")] or list(TOPICS)
    unknown = [t for t in topics if t not in TOPICS]
    if unknown:
        print(f"error: unknown exercise {unknown[0]!r}; choose from {', '.join(TOPICS)}")
        return 2
    passed = failed = 0
    for topic in topics:
        try:
            impl = implementations(topic, reference)
        except Exception as e:  # noqa: BLE001 - a syntax error in the student's file
            print(f"{topic}: exercises/{topic}.py cannot be loaded: {type(e).__name__}: {e}")
            failed += 1
            continue
        current = None
        for name, what, ok, detail in check_topic(topic, impl):
            if name != current:
                print(f"{topic}.{name}")
                current = name
            print(f"  {'pass' if ok else 'FAIL'}  {what}" + (f"  ({detail})" if detail else ""))
            passed, failed = passed + ok, failed + (not ok)
    print(f"{passed} passed, {failed} failed")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
