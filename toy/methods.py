"""The toy's methods: the teacher's samplers, the students distilled from them (Alg. 1 from each
guided sampler; Table 3's baselines from W2SD+CFG), and Alg. 1's settings for each teacher sampler.
A method is a function method(x, ts, c, u) -> samplers.Samples, scored by toy/scoring.py."""

from dataclasses import dataclass

from tinyteef import samplers
from tinyteef.distill import DistillConfig, effective_guidance, effective_w
from tinyteef.guidance import TEEFUSION_DIVISOR

TEACHER_SAMPLERS = {"Teacher Euler+CFG": "cfg", "Teacher Z-Sampling+CFG": "zsampling", "Teacher W2SD+CFG": "w2sd"}


def teacher_methods(teacher, weak, w):
    """The teacher's samplers at guidance w (a number or a schedule), by row name."""
    return {
        "Teacher Euler (no guidance)": lambda x, ts, c, u: samplers.euler(teacher, x, ts, c),
        "Teacher Euler+CFG": lambda x, ts, c, u: samplers.euler_cfg(teacher, x, ts, c, u, w),
        "Teacher naive fusion (Eq. 5)": lambda x, ts, c, u: samplers.naive(teacher, x, ts, c, u, w),
        "Teacher Z-Sampling+CFG": lambda x, ts, c, u: samplers.z_sampling(teacher, x, ts, c, u, w),
        "Teacher W2SD+CFG": lambda x, ts, c, u: samplers.w2sd(teacher, weak, x, ts, c, u, w),
    }


def student_method(s, w):
    """A student's one-pass Euler sampler at guidance w."""
    return lambda x, ts, c, u: samplers.student(s, x, ts, c, u, w)


@dataclass(frozen=True)
class StudentSpec:
    """One student of the toy: Alg. 1 from the teacher sampler `teacher` (cfg | zsampling | w2sd),
    with w entering z as `kind` says (guidance.Student), compared with the teacher row `imitates`.
    `divisor` of the Eq. 7 term (and the ablation's): None = the preset's. `t_dist`: Alg. 1's p(t)
    (flow.T_DISTS), None = the preset's; students of one teacher and p(t) share one stage (targets)."""

    teacher: str
    kind: str
    imitates: str
    divisor: float | None = None
    t_dist: str | None = None

    @property
    def stage(self):
        """The distillation stage that trains this student: its teacher sampler, and p(t) if not the preset's."""
        return self.teacher if self.t_dist is None else f"{self.teacher}-t-{self.t_dist}"


STUDENTS = {
    "TeEFusion from Euler+CFG": StudentSpec("cfg", "teefusion", "Teacher Euler+CFG"),
    "TeEFusion from Z-Sampling+CFG": StudentSpec("zsampling", "teefusion", "Teacher Z-Sampling+CFG"),
    "TeEFusion from W2SD+CFG": StudentSpec("w2sd", "teefusion", "Teacher W2SD+CFG"),
    "TeEFusion, term / 256 (authors' SD3 code), from W2SD+CFG": StudentSpec(
        "w2sd", "teefusion", "Teacher W2SD+CFG", TEEFUSION_DIVISOR),
    "DistillCFG from W2SD+CFG": StudentSpec("w2sd", "distillcfg", "Teacher W2SD+CFG"),
    "G(psi(w)) from W2SD+CFG": StudentSpec("w2sd", "gpsi_ablation", "Teacher W2SD+CFG"),
    # Alg. 1's t ~ U[0, 1] against SD3's pre-training draw, for the same student (the preset's t_dist
    # is the paper's uniform; this row is the alternative)
    "TeEFusion from W2SD+CFG, t logit-normal": StudentSpec("w2sd", "teefusion", "Teacher W2SD+CFG",
                                                           t_dist="logit-normal"),
}
STAGES = {spec.stage: spec for spec in STUDENTS.values()}  # one stage per teacher sampler and p(t), in order


def method_at(name, students, teacher, weak):
    """The teacher sampler or student `name` as a function of w (a number or a schedule)."""
    if name in students:
        return lambda w: student_method(students[name], w)
    return lambda w: teacher_methods(teacher, weak, w)[name]


def distill_config(P, teacher, t_dist=None):
    """Alg. 1's settings for the teacher sampler `teacher`: the students train for the toy's own
    sampling grid (P.sample_steps, shift 1), with t ~ t_dist (default P.t_dist) and
    w ~ U[P.w_min, P.w_max]; the inversion guidance is DistillConfig's default (Z-Sampling at
    w_inv = -1, W2SD's weak model at the strong w), as in train_sd3.py."""
    return DistillConfig(teacher=teacher, w_min=P.w_min, w_max=P.w_max, sample_steps=P.sample_steps, shift=1.0,
                         t_dist=t_dist or P.t_dist)


def matched_rows(P):
    """Rows that compare teacher samplers at the same effective guidance, not the same w (Table 4's
    comparison made like with like): where a teacher sampler at the table's w amounts to CFG at
    another w' (Z-Sampling: 2w + 1), Euler+CFG and its student at w'. Returns {row name: (the
    method it runs, w', the row at the table's w it is compared with)}, w' inside the students' range."""
    rows = {}
    for name, teacher in TEACHER_SAMPLERS.items():
        w_eff = effective_w(distill_config(P, teacher), P.w)
        if w_eff != P.w and P.w_min <= w_eff <= P.w_max:
            label = name.removeprefix("Teacher ")
            rows[f"Teacher Euler+CFG at w = {w_eff:g} ({label}'s effective guidance)"] = (
                "Teacher Euler+CFG", w_eff, name)
            rows[f"TeEFusion from Euler+CFG at w = {w_eff:g}"] = ("TeEFusion from Euler+CFG", w_eff,
                                                                  f"TeEFusion from {label}")
    return rows


def row_guidance(name, P):
    """What a row of the report's table amounts to, to first order in the step
    (distill.effective_guidance) at the table's w, or at its own w for a matched-guidance row; a
    student's is its teacher sampler's. "—" for the rows that are not CFG (Euler without guidance,
    naive fusion)."""
    matched = matched_rows(P)
    if name in matched:
        return f"CFG at w = {matched[name][1]:g}"
    teacher = STUDENTS[name].teacher if name in STUDENTS else TEACHER_SAMPLERS.get(name)
    return "—" if teacher is None else effective_guidance(distill_config(P, teacher), P.w)


# the w sweep's methods (Fig. 5a, Fig. 4): its column label -> the row it runs at each w
SWEEP = {"W2SD+CFG": "Teacher W2SD+CFG", "TeEFusion": "TeEFusion from W2SD+CFG",
         "TeEFusion / 256": "TeEFusion, term / 256 (authors' SD3 code), from W2SD+CFG",
         "DistillCFG": "DistillCFG from W2SD+CFG"}
# the rows the guidance schedule and the negative prompts are tried on: two teachers and their students
PAIRS = ("Teacher Euler+CFG", "TeEFusion from Euler+CFG", "Teacher W2SD+CFG", "TeEFusion from W2SD+CFG")
