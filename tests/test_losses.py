"""Distillation losses: hand-computed values, the papers' identities, numerics and the build API."""

from __future__ import annotations

import math
import statistics

import pytest
import torch
from torch import Tensor

from student_worker.losses import LOSSES, TRAINER_SETTINGS, build, defaults, register
from student_worker.losses.deit import deit_loss
from student_worker.losses.dist import dist_loss
from student_worker.losses.dkd import decoupled_terms, dkd_loss
from student_worker.losses.kd import kd_loss, kd_per_sample

NO_LABELS = torch.zeros(2, dtype=torch.long)


def logits_of(probs: list[list[float]], temperature: float = 1.0) -> Tensor:
    """Logits whose softmax at `temperature` is exactly `probs`."""
    return temperature * torch.tensor(probs, dtype=torch.float64).log()


def kl(p: list[float], q: list[float]) -> float:
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))


def random_case(
    seed: int = 0, samples: int = 8, classes: int = 10
) -> tuple[Tensor, Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    student = 3 * torch.randn(samples, classes, generator=generator, dtype=torch.float64)
    teacher = 3 * torch.randn(samples, classes, generator=generator, dtype=torch.float64)
    labels = torch.randint(classes, (samples,), generator=generator)
    return student, teacher, labels


def loss_hyperparameters(name: str, image_size: int = 32) -> dict[str, float | int | str]:
    recipe = defaults(name, image_size)
    return {key: value for key, value in recipe.items() if key not in TRAINER_SETTINGS}


def all_configurations() -> list[object]:
    """Every loss at both image scales' defaults, plus soft DeiT."""
    configurations = [
        pytest.param(name, loss_hyperparameters(name, size), id=f"{name}-{size}px")
        for name in sorted(LOSSES)
        for size in (32, 224)
    ]
    return [*configurations, pytest.param("deit", {"mode": "soft", "tau": 3.0}, id="deit-soft")]


def test_kd_hand_computed() -> None:
    temperature = 2.0
    student = logits_of([[0.5, 0.5], [0.5, 0.5]], temperature)
    teacher = logits_of([[0.75, 0.25], [0.5, 0.5]], temperature)
    expected = temperature**2 * (kl([0.75, 0.25], [0.5, 0.5]) + 0.0) / 2
    loss = build("kd", temperature=temperature)(student, teacher, NO_LABELS)
    assert loss.item() == pytest.approx(expected, rel=1e-12)


def test_dkd_hand_computed() -> None:
    temperature, alpha, beta = 2.0, 0.5, 3.0
    student = logits_of([[1 / 3, 1 / 3, 1 / 3], [0.5, 0.25, 0.25]], temperature)
    teacher = logits_of([[0.5, 1 / 3, 1 / 6], [0.1, 0.3, 0.6]], temperature)
    labels = torch.tensor([0, 2])
    tckd = [kl([0.5, 0.5], [1 / 3, 2 / 3]), kl([0.6, 0.4], [0.25, 0.75])]
    nckd = [kl([2 / 3, 1 / 3], [0.5, 0.5]), kl([0.25, 0.75], [2 / 3, 1 / 3])]
    expected = (
        temperature**2 * sum(alpha * t + beta * n for t, n in zip(tckd, nckd, strict=True)) / 2
    )
    loss = build("dkd", alpha=alpha, beta=beta, temperature=temperature)(student, teacher, labels)
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    _, _, p_t = decoupled_terms(student, teacher, labels, temperature=temperature)
    assert p_t.tolist() == pytest.approx([0.5, 0.6], rel=1e-12)


def test_dist_hand_computed() -> None:
    tau, beta, gamma = 2.0, 1.5, 0.5
    teacher_probs = [[0.5, 0.3, 0.2], [0.1, 0.3, 0.6], [0.2, 0.5, 0.3]]
    student_probs = [[0.2, 0.3, 0.5], [0.25, 0.25, 0.5], [0.4, 0.4, 0.2]]
    rows = [
        1 - statistics.correlation(s, t) for s, t in zip(student_probs, teacher_probs, strict=True)
    ]
    columns = [
        1 - statistics.correlation(s, t)
        for s, t in zip(
            zip(*student_probs, strict=True), zip(*teacher_probs, strict=True), strict=True
        )
    ]
    expected = tau**2 * (beta * statistics.mean(rows) + gamma * statistics.mean(columns))
    loss = build("dist", beta=beta, gamma=gamma, tau=tau)(
        logits_of(student_probs, tau), logits_of(teacher_probs, tau), NO_LABELS
    )
    assert loss.item() == pytest.approx(expected, rel=1e-9)


def test_deit_hand_computed() -> None:
    tau = 2.0
    student = logits_of([[0.25, 0.75], [0.5, 0.5]], tau)
    teacher = logits_of([[0.75, 0.25], [0.1, 0.9]], tau)
    soft = tau**2 * (kl([0.75, 0.25], [0.25, 0.75]) + kl([0.1, 0.9], [0.5, 0.5])) / (2 * 2)
    hard = (-math.log(0.25) - math.log(0.5)) / 2
    assert build("deit", mode="soft", tau=tau)(student, teacher, NO_LABELS).item() == (
        pytest.approx(soft, rel=1e-12)
    )
    student_at_1 = logits_of([[0.25, 0.75], [0.5, 0.5]])
    assert build("deit", mode="hard")(student_at_1, teacher, NO_LABELS).item() == (
        pytest.approx(hard, rel=1e-12)
    )


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_kd_splits_into_tckd_and_nckd_per_sample(temperature: float) -> None:
    student, teacher, labels = random_case()
    tckd, nckd, p_t = decoupled_terms(student, teacher, labels, temperature=temperature)
    kd = kd_per_sample(student, teacher, temperature=temperature)
    torch.testing.assert_close(tckd + (1 - p_t) * nckd, kd)
    assert (tckd > 0).all()
    assert (nckd > 0).all()


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_dkd_with_beta_one_minus_p_t_is_kd(temperature: float) -> None:
    student, teacher, labels = random_case(seed=1)
    _, _, p_t = decoupled_terms(student, teacher, labels, temperature=temperature)
    for i in range(len(labels)):
        one = slice(i, i + 1)
        dkd = dkd_loss(
            student[one],
            teacher[one],
            labels[one],
            alpha=1.0,
            beta=1 - p_t[i].item(),
            temperature=temperature,
        )
        kd = kd_loss(student[one], teacher[one], labels[one], temperature=temperature)
        torch.testing.assert_close(dkd, kd)


def test_kd_is_zero_exactly_when_the_distributions_match() -> None:
    student, teacher, labels = random_case(seed=2)
    per_sample_shift = torch.linspace(-5, 5, len(labels), dtype=torch.float64)[:, None]
    same = kd_loss(student, student + per_sample_shift, labels, temperature=4.0)
    assert same.item() == pytest.approx(0.0, abs=1e-12)
    assert (kd_per_sample(student, teacher, temperature=4.0) > 1e-6).all()


def test_dist_is_zero_for_the_teacher_and_ignores_per_sample_shifts() -> None:
    student, teacher, labels = random_case(seed=3)
    hyperparameters = {"beta": 2.0, "gamma": 2.0, "tau": 4.0}
    assert dist_loss(teacher, teacher, labels, **hyperparameters).item() == pytest.approx(
        0.0, abs=1e-9
    )
    per_sample_shift = torch.linspace(-50, 50, len(labels), dtype=torch.float64)[:, None]
    torch.testing.assert_close(
        dist_loss(student + per_sample_shift, teacher, labels, **hyperparameters),
        dist_loss(student, teacher, labels, **hyperparameters),
    )
    assert dist_loss(student, teacher, labels, **hyperparameters).item() > 0.1


def test_hard_deit_is_cross_entropy_against_the_teacher_argmax() -> None:
    student, teacher, labels = random_case(seed=4)
    teacher_choice = teacher.argmax(dim=1)
    expected = -student.log_softmax(dim=1)[torch.arange(len(labels)), teacher_choice].mean()
    torch.testing.assert_close(deit_loss(student, teacher, labels, mode="hard"), expected)


@pytest.mark.parametrize("tau", [1.0, 3.0])
def test_soft_deit_is_kd_divided_by_the_number_of_classes(tau: float) -> None:
    student, teacher, labels = random_case(seed=5, classes=7)
    torch.testing.assert_close(
        deit_loss(student, teacher, labels, mode="soft", tau=tau),
        kd_loss(student, teacher, labels, temperature=tau) / 7,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize(("name", "hyperparameters"), all_configurations())
def test_gradients_stay_finite_for_extreme_logits(
    name: str, hyperparameters: dict[str, float | int | str], dtype: torch.dtype
) -> None:
    rows = [[1e4, -1e4, 0.0, 80.0, -80.0], [80.0, 80.0, -1e4, 0.0, 1e4], [-1e4] * 4 + [1e4]]
    student = torch.tensor(rows, dtype=dtype, requires_grad=True)
    teacher = torch.tensor(rows, dtype=dtype).flip(dims=[1])
    labels = torch.tensor([1, 2, 0])
    loss = build(name, **hyperparameters)(student, teacher, labels)
    loss.backward()
    assert loss.dtype == torch.float32
    assert torch.isfinite(loss)
    assert student.grad is not None
    assert torch.isfinite(student.grad).all()


@pytest.mark.parametrize(("name", "hyperparameters"), all_configurations())
def test_every_loss_is_a_scalar_that_trains_the_student_only(
    name: str, hyperparameters: dict[str, float | int | str]
) -> None:
    student, teacher, labels = random_case(seed=6)
    student.requires_grad_(True)
    loss = build(name, **hyperparameters)(student, teacher, labels)
    assert loss.ndim == 0
    loss.backward()
    assert teacher.grad is None
    assert student.grad is not None
    assert student.grad.abs().sum() > 0


def test_defaults_follow_the_image_scale() -> None:
    assert sorted(LOSSES) == ["deit", "dist", "dkd", "kd"]
    assert defaults("dkd", 32) == {
        "alpha": 1.0,
        "beta": 8.0,
        "temperature": 4.0,
        "ce_weight": 1.0,
        "kd_weight": 1.0,
        "warmup_epochs": 20,
        "label_smoothing": 0.0,
    }
    assert defaults("dkd", 64)["warmup_epochs"] == 20
    imagenet = defaults("dkd", 224)
    assert (imagenet["alpha"], imagenet["beta"], imagenet["temperature"]) == (0.5, 0.5, 1.0)
    assert imagenet["warmup_epochs"] == 1
    assert defaults("kd", 32)["ce_weight"] == 0.1
    assert defaults("kd", 32)["kd_weight"] == 0.9
    assert [defaults("dist", size)["tau"] for size in (32, 224)] == [4.0, 1.0]
    assert defaults("deit", 224)["ce_weight"] == defaults("deit", 224)["kd_weight"] == 0.5


@pytest.mark.parametrize(
    ("name", "hyperparameters", "message"),
    [
        ("kld", {}, "unknown loss 'kld'; known losses: deit, dist, dkd, kd"),
        ("kd", {"temperature": 0.0}, "temperature=0.0 must be > 0"),
        ("kd", {"temperature": -2}, "temperature=-2 must be > 0"),
        ("kd", {"temperature": float("nan")}, "temperature=nan must be a finite number"),
        ("kd", {"temperature": True}, "temperature=True must be a finite number"),
        ("kd", {"temperature": "4"}, "temperature='4' must be a finite number"),
        ("kd", {}, "loss 'kd' needs hyper-parameter(s) temperature"),
        ("kd", {"temperature": 4.0, "tau": 4.0}, "unknown hyper-parameter tau=4.0"),
        ("kd", {"temperature": 4.0, "ce_weight": 0.1}, "a trainer setting"),
        ("dkd", {"alpha": 1.0, "beta": -8.0, "temperature": 4.0}, "beta=-8.0 must be >= 0"),
        ("dist", {"beta": 2.0, "gamma": 2.0}, "needs hyper-parameter(s) tau"),
        ("deit", {"mode": "medium"}, "mode='medium' is not one of 'soft', 'hard'"),
    ],
)
def test_build_names_the_bad_input(
    name: str, hyperparameters: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError) as error:
        build(name, **hyperparameters)
    assert message in str(error.value)


def test_defaults_reject_an_unknown_loss_and_a_bad_image_size() -> None:
    with pytest.raises(ValueError, match="unknown loss 'fitnet'"):
        defaults("fitnet", 32)
    with pytest.raises(ValueError, match="image_size must be a positive number of pixels, got 0"):
        defaults("kd", 0)


def test_inputs_in_the_wrong_form_are_rejected() -> None:
    student, teacher, labels = random_case(seed=7)
    with pytest.raises(ValueError, match=r"\(8, 10\) and \(8, 9\)"):
        kd_loss(student, teacher[:, :9], labels, temperature=4.0)
    soft_labels = torch.nn.functional.one_hot(labels, 10).double()
    with pytest.raises(ValueError, match="int64 class indices of shape \\(8,\\)"):
        dkd_loss(student, teacher, soft_labels, alpha=1.0, beta=8.0, temperature=4.0)


def test_register_rejects_duplicates_and_undeclared_hyperparameters() -> None:
    recipe = {"temperature": 4.0, **dict.fromkeys(TRAINER_SETTINGS, 0)}
    with pytest.raises(ValueError, match="loss 'kd' is already registered"):
        register("kd", positive=("temperature",), small_images=recipe)(kd_loss)

    def scaled(student: Tensor, teacher: Tensor, labels: Tensor, *, scale: float) -> Tensor:
        return scale * (student - teacher).square().mean()

    with pytest.raises(TypeError, match="declare each hyper-parameter of scaled \\(scale\\)"):
        register("scaled", small_images={"scale": 1.0})(scaled)
    assert "scaled" not in LOSSES
