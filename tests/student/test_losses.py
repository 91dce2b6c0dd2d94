"""Distillation losses: hand-computed values, the papers' identities, numerics and the build API."""

from __future__ import annotations

import math
import statistics

import pytest
import torch
from torch import Tensor

from student_worker import losses
from student_worker.losses import Hyperparameters, Recipe, register
from student_worker.losses.deit import DeiTParams, deit_loss
from student_worker.losses.dist import DISTParams, dist_loss
from student_worker.losses.dkd import DKDParams, decoupled_terms, dkd_loss
from student_worker.losses.kd import KDParams, kd_loss, kd_per_sample
from student_worker.objective import Distill, ObjectiveWeights

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


DISTILLATION = ["deit", "dist", "dkd", "kd"]


def build(name: str, image_size: int = 32, **hyperparameters: object) -> Distill:
    """The registered loss `name` bound to its recipe with `hyperparameters` in its place."""
    distill = losses.get(name).objective(image_size, hyperparameters=hyperparameters).distill
    assert distill is not None
    return distill


def all_configurations() -> list[object]:
    """Every distillation loss at both image scales' recipes, plus soft DeiT."""
    configurations = [
        pytest.param(name, size, {}, id=f"{name}-{size}px")
        for name in DISTILLATION
        for size in (32, 224)
    ]
    soft = pytest.param("deit", 32, {"mode": "soft", "tau": 3.0}, id="deit-soft")
    return [*configurations, soft]


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
        params = DKDParams(alpha=1.0, beta=1 - p_t[i].item(), temperature=temperature)
        dkd = dkd_loss(student[one], teacher[one], labels[one], params=params)
        kd = kd_loss(
            student[one], teacher[one], labels[one], params=KDParams(temperature=temperature)
        )
        torch.testing.assert_close(dkd, kd)


def test_kd_is_zero_exactly_when_the_distributions_match() -> None:
    student, teacher, labels = random_case(seed=2)
    per_sample_shift = torch.linspace(-5, 5, len(labels), dtype=torch.float64)[:, None]
    same = kd_loss(student, student + per_sample_shift, labels, params=KDParams(temperature=4.0))
    assert same.item() == pytest.approx(0.0, abs=1e-12)
    assert (kd_per_sample(student, teacher, temperature=4.0) > 1e-6).all()


def test_dist_is_zero_for_the_teacher_and_ignores_per_sample_shifts() -> None:
    student, teacher, labels = random_case(seed=3)
    params = DISTParams(beta=2.0, gamma=2.0, tau=4.0)
    assert dist_loss(teacher, teacher, labels, params=params).item() == pytest.approx(0.0, abs=1e-9)
    per_sample_shift = torch.linspace(-50, 50, len(labels), dtype=torch.float64)[:, None]
    torch.testing.assert_close(
        dist_loss(student + per_sample_shift, teacher, labels, params=params),
        dist_loss(student, teacher, labels, params=params),
    )
    assert dist_loss(student, teacher, labels, params=params).item() > 0.1


def test_hard_deit_is_cross_entropy_against_the_teacher_argmax() -> None:
    student, teacher, labels = random_case(seed=4)
    teacher_choice = teacher.argmax(dim=1)
    expected = -student.log_softmax(dim=1)[torch.arange(len(labels)), teacher_choice].mean()
    hard = DeiTParams(mode="hard")
    torch.testing.assert_close(deit_loss(student, teacher, labels, params=hard), expected)


@pytest.mark.parametrize("tau", [1.0, 3.0])
def test_soft_deit_is_kd_divided_by_the_number_of_classes(tau: float) -> None:
    student, teacher, labels = random_case(seed=5, classes=7)
    torch.testing.assert_close(
        deit_loss(student, teacher, labels, params=DeiTParams(mode="soft", tau=tau)),
        kd_loss(student, teacher, labels, params=KDParams(temperature=tau)) / 7,
    )
    # The paper's equation, per sample: exactly KD at the same temperature.
    per_sample = DeiTParams(mode="soft", tau=tau, reduction="per_sample")
    torch.testing.assert_close(
        deit_loss(student, teacher, labels, params=per_sample),
        kd_loss(student, teacher, labels, params=KDParams(temperature=tau)),
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize(("name", "image_size", "hyperparameters"), all_configurations())
def test_gradients_stay_finite_for_extreme_logits(
    name: str, image_size: int, hyperparameters: dict[str, object], dtype: torch.dtype
) -> None:
    rows = [[1e4, -1e4, 0.0, 80.0, -80.0], [80.0, 80.0, -1e4, 0.0, 1e4], [-1e4] * 4 + [1e4]]
    student = torch.tensor(rows, dtype=dtype, requires_grad=True)
    teacher = torch.tensor(rows, dtype=dtype).flip(dims=[1])
    labels = torch.tensor([1, 2, 0])
    loss = build(name, image_size, **hyperparameters)(student, teacher, labels)
    loss.backward()
    assert loss.dtype == torch.float32
    assert torch.isfinite(loss)
    assert student.grad is not None
    assert torch.isfinite(student.grad).all()


@pytest.mark.parametrize(("name", "image_size", "hyperparameters"), all_configurations())
def test_every_loss_is_a_scalar_that_trains_the_student_only(
    name: str, image_size: int, hyperparameters: dict[str, object]
) -> None:
    student, teacher, labels = random_case(seed=6)
    student.requires_grad_(True)
    loss = build(name, image_size, **hyperparameters)(student, teacher, labels)
    assert loss.ndim == 0
    loss.backward()
    assert teacher.grad is None
    assert student.grad is not None
    assert student.grad.abs().sum() > 0


def recipe(name: str, image_size: int) -> dict[str, object]:
    chosen = losses.get(name).recipe(image_size)
    return {**chosen.weights.model_dump(), **chosen.params.model_dump()}


def test_the_registry_is_the_one_list_of_losses() -> None:
    assert losses.names() == ["ce", *DISTILLATION]
    assert not losses.get("ce").needs_teacher
    assert all(losses.get(name).needs_teacher for name in DISTILLATION)


def test_recipes_follow_the_image_scale() -> None:
    assert recipe("dkd", 32) == {
        "alpha": 1.0,
        "beta": 8.0,
        "temperature": 4.0,
        "ce_weight": 1.0,
        "kd_weight": 1.0,
        "warmup_epochs": 20,
        "label_smoothing": 0.0,
    }
    assert recipe("dkd", 64)["warmup_epochs"] == 20
    imagenet = recipe("dkd", 224)
    assert (imagenet["alpha"], imagenet["beta"], imagenet["temperature"]) == (0.5, 0.5, 1.0)
    assert imagenet["warmup_epochs"] == 1
    assert (recipe("kd", 32)["ce_weight"], recipe("kd", 32)["kd_weight"]) == (0.1, 0.9)
    assert [recipe("dist", size)["tau"] for size in (32, 224)] == [4.0, 1.0]
    assert recipe("deit", 224)["ce_weight"] == recipe("deit", 224)["kd_weight"] == 0.5
    assert recipe("deit", 224)["label_smoothing"] == 0.1
    assert recipe("ce", 32) == {
        "ce_weight": 1.0,
        "kd_weight": 0.0,
        "warmup_epochs": 0,
        "label_smoothing": 0.0,
    }


@pytest.mark.parametrize(
    ("name", "hyperparameters", "weights", "message"),
    [
        ("kd", {"temperature": 0.0}, {}, "temperature: Input should be greater than 0"),
        ("kd", {"temperature": -2}, {}, "(got -2)"),
        ("kd", {"temperature": float("nan")}, {}, "temperature: Input should be a finite number"),
        ("kd", {"temperature": "hot"}, {}, "temperature: Input should be a valid number"),
        ("kd", {"tau": 4.0}, {}, "tau: Extra inputs are not permitted"),
        ("dkd", {"beta": -8.0}, {}, "beta: Input should be greater than or equal to 0"),
        ("deit", {"mode": "medium"}, {}, "mode: Input should be 'soft' or 'hard'"),
        ("kd", {}, {"ce_weight": -0.1}, "ce_weight: Input should be greater than or equal to 0"),
        ("kd", {}, {"label_smoothing": 1.0}, "label_smoothing: Input should be less than 1"),
    ],
)
def test_bad_values_name_the_loss_and_the_key(
    name: str, hyperparameters: dict[str, object], weights: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError) as error:
        losses.get(name).objective(32, hyperparameters=hyperparameters, weights=weights)
    assert str(error.value).startswith(f"loss {name!r}: ") and message in str(error.value)


def test_an_unknown_loss_or_image_size_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown loss 'fitnet'; known losses: ce, deit, dist"):
        losses.get("fitnet")
    with pytest.raises(ValueError, match="image_size must be a positive number of pixels, got 0"):
        losses.get("kd").recipe(0)


def test_inputs_in_the_wrong_form_are_rejected() -> None:
    student, teacher, labels = random_case(seed=7)
    with pytest.raises(ValueError, match=r"\(8, 10\) and \(8, 9\)"):
        kd_loss(student, teacher[:, :9], labels, params=KDParams(temperature=4.0))
    soft_labels = torch.nn.functional.one_hot(labels, 10).double()
    with pytest.raises(ValueError, match="int64 class indices of shape \\(8,\\)"):
        params = DKDParams(alpha=1.0, beta=8.0, temperature=4.0)
        dkd_loss(student, teacher, soft_labels, params=params)


def test_register_refuses_a_taken_name_and_a_recipe_of_other_parameters() -> None:
    weights = ObjectiveWeights(ce_weight=1.0, kd_weight=1.0, warmup_epochs=0, label_smoothing=0.0)
    with pytest.raises(ValueError, match="loss 'kd' is already registered"):
        register("kd", KDParams, small_images=Recipe(weights, KDParams(temperature=4.0)))(kd_loss)

    class Scale(Hyperparameters):
        scale: float

    def scaled(student: Tensor, teacher: Tensor, labels: Tensor, *, params: Scale) -> Tensor:
        return params.scale * (student - teacher).square().mean()

    with pytest.raises(TypeError, match="a recipe's params must be Scale, got KDParams"):
        register("scaled", Scale, small_images=Recipe(weights, KDParams(temperature=1.0)))(
            scaled  # type: ignore[arg-type]
        )
    assert "scaled" not in losses.names()
