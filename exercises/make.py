"""Write the exercise files from the repository's own code, so that they cannot drift from it.

Each exercise is a function of the reference code whose body sits between nbgrader's markers,
`### BEGIN SOLUTION` and `### END SOLUTION`. This script copies the function (decorators, signature,
docstring) into `exercises/<topic>.py` with that body replaced by a stub that raises
"not implemented yet", and imports whatever else the body may use from the reference modules.

    python exercises/make.py            # rewrite every exercise file
    python exercises/make.py --check    # exit 1 if a file differs from what would be written
"""

from __future__ import annotations

import ast
import builtins
import importlib
import inspect
import sys
import textwrap
import types
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BEGIN, END = "### BEGIN SOLUTION", "### END SOLUTION"

# topic: (what it covers, [(module, function), ...]); the checker (check.py) has the same topics.
TOPICS = {
    "basics": ("the cosine schedule, the DDIM step, its inversion and classifier-free guidance "
               "(docs/methods.md section 0)",
               [("common", "alpha_sigma"), ("common", "ddim_step"), ("common", "invert_ddim"), ("common", "cfg")]),
    "progressive": ("progressive distillation's target and loss weighting (PD Alg. 2; docs/methods.md section 1)",
                    [("progressive_distill", "pd_target"), ("progressive_distill", "snr_weight")]),
    "guided": ("guided distillation's stage-one target and the stochastic sampler's re-noising step "
               "(Meng et al.; docs/methods.md section 2)",
               [("guided_distill", "guided_target"), ("guided_distill", "renoise")]),
    "dmd": ("DMD's distribution-matching gradient, the fake score's loss and the K-step generator "
            "(Yin et al., DMD2; docs/methods.md section 3)",
            [("dmd", "dmd_generator_loss"), ("dmd", "fake_score_loss"), ("dmd", "generate")]),
    "disback": ("DisBack's backtracking schedule of real scores (Zhang et al.; docs/methods.md section 4)",
                [("disback", "snapshot_index")]),
}


# Shapes and a hint for each exercise, written above its stub.
HINTS = {
    "alpha_sigma": ["t is a float or a tensor of any shape; return two tensors of its shape.",
                    "_as_time(t) makes an fp32 tensor of it; clamp alpha at 0."],
    "ddim_step": ["x_hat, z_t: (B, ...); t, s: floats or (B,) tensors. _coeffs(t, z_t) gives alpha_t,",
                  "sigma_t shaped to broadcast against z_t. First the noise the step keeps: eps_hat."],
    "invert_ddim": ["z_t, z_s: (B, ...). Solve the DDIM step z_s = alpha_s x + sigma_s (z_t - alpha_t x) / sigma_t",
                    "for x."],
    "cfg": ["w is a float or a (B,) tensor: bcast(_as_time(w, x_cond), x_cond) shapes it for x (B, ...)."],
    "pd_target": ["t (B,) on the student's N-step grid: t' = t - 0.5 / N, t'' = t - 1 / N. Two teacher DDIM",
                  "steps (ddim_step), then invert_ddim from z_t to z_t''. No gradient reaches the teacher."],
    "snr_weight": ["SNR = exp(logsnr(t)); truncated-snr is max(SNR, 1), snr+1 is SNR + 1; other names are errors."],
    "guided_target": ["guided(teacher, w, null_label) makes a guided denoiser (two calls of the teacher)."],
    "renoise": ["s < t are floats; alpha_sigma(s), alpha_sigma(t). The variance of z_t given z_s is",
                "sigma_t^2 - (alpha_t / alpha_s)^2 sigma_s^2."],
    "dmd_generator_loss": ["Draw t ~ U[DM_T_MIN, DM_T_MAX] and eps when not given; both scores without gradient,",
                           "normaliser per sample over all but the batch dimension; the loss's gradient in x is grad",
                           "divided by x.numel() (a mean): 0.5 * (x - (x - grad).detach())^2, averaged."],
    "fake_score_loss": ["Alg. 1's loss (diffusion_loss) on the generator's samples, with no gradient into them."],
    "generate": ["times = generator_times(steps); predict x at each t_k; re-noise it with fresh noise",
                 "(torch.randn_like) to the next time with diffuse; with first=k return (z, t_k) before step k."],
    "snapshot_index": ["N - 1 for the first `interval` updates, then one less every `interval`, never below 0."],
}


def stub(function, topic: str) -> tuple[str, set[str]]:
    """The function's source with its marked body replaced by a stub, and the global names it uses."""
    source = inspect.getsource(function)
    lines = source.splitlines(keepends=True)
    begin = next(i for i, line in enumerate(lines) if line.strip() == BEGIN)
    end = next(i for i, line in enumerate(lines) if line.strip() == END)
    indent = lines[begin][: len(lines[begin]) - len(lines[begin].lstrip())]
    hint = [f"{indent}# Hint: {line}\n" for line in HINTS.get(function.__name__, ())]
    pad = indent + " " * len("raise NotImplementedError(")
    raise_ = (f'{indent}raise NotImplementedError("not implemented yet: write {function.__name__} in '
              f'exercises/{topic}.py,"\n{pad}" then run `python exercises/check.py {topic}`")\n')
    lines[begin:end + 1] = [*hint, raise_]
    tree = ast.parse(source)
    fn = tree.body[0]
    local = {a.arg for a in ast.walk(fn.args) if isinstance(a, ast.arg)} | {fn.name}
    used = {n.id for n in ast.walk(fn) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
    return "".join(lines), used - local - set(dir(builtins))


def render(topic: str) -> str:
    about, functions = TOPICS[topic]
    bodies, imports, modules = [], {}, set()
    for module_name, name in functions:
        module = importlib.import_module(module_name)
        text, used = stub(getattr(module, name), topic)
        bodies.append(text)
        for ref in sorted(used):
            obj = getattr(module, ref, None)
            if isinstance(obj, types.ModuleType):
                modules.add(obj.__name__)
            elif obj is not None:
                origin = getattr(obj, "__module__", None) if callable(obj) else None
                source = origin if origin in ("common", "dmd", "guided_distill", "progressive_distill", "disback") \
                    else module_name
                imports.setdefault(source, set()).add(ref)
    names = {name for _, name in functions}
    title = textwrap.fill(f"Exercises: {about}.", 100)
    header = [f'"""{title}\n\nWrite the body of each function below from its docstring, then check it:\n\n'
              f"    python exercises/check.py {topic}\n\n"
              "Generated by `python exercises/make.py` from the repository's own code. Keep the signatures;\n"
              'everything imported below is the reference code and may be used.\n"""\n\n',
              "from __future__ import annotations\n\n"]
    header += [f"import {m}  # noqa: F401\n" for m in sorted(modules)]
    header.append("\n" if modules else "")
    for source in sorted(imports):
        refs = sorted(imports[source] - names)
        if refs:
            header.append(f"from {source} import {', '.join(refs)}  # noqa: F401\n")
    return "".join(header) + "\n\n" + "\n\n".join(bodies)


def main(argv: list[str]) -> int:
    sys.path.insert(0, str(ROOT))
    stale = []
    for topic in TOPICS:
        path, text = HERE / f"{topic}.py", render(topic)
        if "--check" in argv:
            if not path.exists() or path.read_text() != text:
                stale.append(path.name)
        else:
            path.write_text(text)
            print(f"wrote {path.relative_to(ROOT)}")
    if stale:
        print(f"error: {', '.join(stale)} differ from the reference code; run `python exercises/make.py`")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
