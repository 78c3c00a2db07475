"""The paper's two-step fine-tuning (section 4.3) and BatchNorm re-estimation after compression.

Step 1 trains only the BasisConv2d coefficients; step 2 every non-convolutional parameter
(coefficients, BatchNorm, fully connected layers, biases). The basis filters are buffers and
the weights of convolutions kept as they are stay frozen throughout. Beyond the paper,
``learn_basis=True`` trains the bases too, in step 1 beside the coefficients (both factors of
each low-rank conv; the multiplications do not change, the learnable values do).
"""
from __future__ import annotations

from minibasis import backend
from minibasis.autograd import Tensor, no_grad
from minibasis.checks import positive_int, positive_number
from minibasis.nn import BasisConv2d, BatchNorm1d, BatchNorm2d, Conv2d
from minibasis.training.trainer import Trainer

__all__ = ["fine_tune", "recalibrate_batch_norm", "coefficient_parameters", "conv_weight_parameters",
           "basis_parameters", "learnable_bases", "non_conv_parameters", "freeze_all_but", "DEFAULT_BASIS_LR_SCALE"]

#: The bases' step-1 rate as a multiple of the coefficients' (``learn_basis``): on a compressed
#: ResNet-20 (greedy, 45 % of the multiplications; 10,000 training images, 3 epochs) 0.01 and 0.03
#: reached 79.7 % and 79.5 %, 0.1 78.4 % (as the coefficients alone), 1.0 49.6 %.
DEFAULT_BASIS_LR_SCALE = 0.03


def coefficient_parameters(model) -> list:
    """The 1×1 coefficients (M×Q) of every ``BasisConv2d``."""
    return [m.coeffs for m in model.modules() if isinstance(m, BasisConv2d)]


def conv_weight_parameters(model) -> list:
    """The weights (not biases) of every ordinary ``Conv2d``."""
    return [m.weight for m in model.modules() if isinstance(m, Conv2d)]


def basis_parameters(model) -> list:
    """The bases (Q, C, kh, kw) of every ``BasisConv2d`` whose basis is a Parameter
    (:meth:`~minibasis.nn.BasisConv2d.learnable_basis`); empty for the paper's fixed bases."""
    return [m.basis for m in model.modules() if isinstance(m, BasisConv2d) and m.basis_is_learnable]


def learnable_bases(model) -> list:
    """Make the basis of every ``BasisConv2d`` a Parameter; returns them (:func:`basis_parameters`).

    A ValueError when the model has no BasisConv2d (there is no basis to learn)."""
    layers = [m for m in model.modules() if isinstance(m, BasisConv2d)]
    if not layers:
        raise ValueError("learn_basis: the model has no BasisConv2d layer, so no basis to learn (compress it first)")
    for layer in layers:
        layer.learnable_basis(True)
    return basis_parameters(model)


def non_conv_parameters(model) -> list:
    """Every parameter except conv filters: ``Conv2d`` weights and learnable bases (the paper's
    fixed basis is a buffer, never a parameter)."""
    frozen = {id(p) for p in conv_weight_parameters(model) + basis_parameters(model)}
    return [p for p in model.parameters() if id(p) not in frozen]


def freeze_all_but(model, params: list) -> list:
    """``requires_grad`` only on ``params``; returns them."""
    model.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    return params


def recalibrate_batch_norm(model, images, *, batch_size: int = 256, transform=None) -> int:
    """Re-estimate every BatchNorm's running statistics from ``images`` (N, C, H, W); returns the count.

    Forward passes in train mode under ``no_grad``, no parameter changes. Each BatchNorm's
    running mean and variance become the plain average, over the batches, of the batch mean
    and unbiased batch variance (PyTorch's ``momentum=None``): batch k (from 0) enters with
    momentum 1/(k+1), so the first batch overwrites the old statistics and no trace of them
    stays. Why: compressing the convs shifts every activation, so the stored statistics no
    longer fit and the network scores far below what its weights allow. The model's
    train/eval mode and each layer's momentum are restored afterwards.
    """
    positive_int("batch_size", batch_size)
    norms = [m for m in model.modules() if isinstance(m, (BatchNorm1d, BatchNorm2d)) and m.track_running_stats]
    if not norms or len(images) == 0:
        return 0
    was_training, momenta = model.training, [m.momentum for m in norms]
    model.train()
    try:
        with no_grad():
            for k, start in enumerate(range(0, len(images), batch_size)):
                for m in norms:
                    m.momentum = 1.0 / (k + 1)
                batch = images[start:start + batch_size]
                batch = transform(batch) if transform is not None else batch
                model(Tensor(backend.asarray(batch)))
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        model.train(was_training)
    return len(images)


def fine_tune(model, loader, *, step1_params: list | None = None, epochs1: int = 15, lr1: float = 0.1, lr1_step: int = 5,
              epochs2: int = 10, lr2: float = 5e-4, momentum: float = 0.9, weight_decay: float = 1e-4,
              eval_fn=None, folder=None, seed: int = 0, detect_anomaly: bool = False, progress: bool = True,
              resume: bool = False, extra_meta: dict | None = None, on_step_end=None, teacher=None,
              distill_weight: float = 0.0, temperature: float = 4.0, learn_basis: bool = False,
              basis_lr_scale: float = DEFAULT_BASIS_LR_SCALE) -> list[dict]:
    """The paper's two steps on ``model``; returns the metrics rows of every epoch.

    Step 1 (stage ``step1``) trains ``step1_params`` only (default: the coefficients of a
    compressed model, :func:`coefficient_parameters`) with SGD at ``lr1``, divided by 10 every ``lr1_step`` epochs; step 2 (stage
    ``step2``) trains :func:`non_conv_parameters` at ``lr2``. Everything else is frozen
    (``requires_grad`` False). ``on_step_end(stage, model)`` runs after each step. With a
    ``folder``, each step checkpoints every epoch and ``resume`` continues from there. On
    return conv filters (``Conv2d`` weights, learnable bases) stay frozen and every other
    parameter requires a gradient.

    ``learn_basis`` (beyond the paper, whose bases stay fixed): every BasisConv2d's basis becomes
    a Parameter (:func:`learnable_bases`) and the default ``step1_params`` are the coefficients
    and the bases, as ``--baseline`` trains an original's conv weights in step 1; step 2 is
    unchanged. The multiplications of the trained network are those of the compressed one; its
    learnable values grow by Q·D per layer, and the bases are no longer orthonormal. The bases
    learn at ``basis_lr_scale`` × the step-1 rate (their own parameter group): a basis vector's
    gradient is the coefficients' column times the output gradient, and those columns have norm
    √λ (2–4 on a pretrained ResNet-20 against the basis vectors' 1), so at the full rate the
    bases move several times faster, relative to their size, than the coefficients.

    Distillation (both steps): with a ``teacher`` (e.g. the uncompressed original, a separate
    model) and ``distill_weight`` w > 0, the loss is
    (1 − w)·CE + w·T²·KL(softmax(teacher/T) ‖ softmax(student/T)), T = ``temperature``
    (:class:`~minibasis.training.distill.Distillation`: the teacher runs in eval mode under
    ``no_grad`` and never changes; its multiplications are counted apart and each metrics row
    carries them as ``teacher_mults``). With w = 0 or no teacher the loss is the plain
    cross-entropy, exactly as without these arguments.
    """
    from minibasis import optim
    from minibasis.training.distill import Distillation

    distillation = None
    if teacher is not None or distill_weight:
        if teacher is None:
            raise ValueError(f"fine_tune: distill_weight={distill_weight!r} needs a teacher")
        if teacher is model:
            raise ValueError("fine_tune: the teacher must be a separate model (e.g. copy_module of the original), "
                             "not the model being trained")
        distillation = Distillation(teacher, distill_weight, temperature)   # validates both numbers
        if distillation.weight == 0:
            distillation = None

    # Bases made learnable here or before (learnable_bases): in step 1 they get their own rate.
    bases = learnable_bases(model) if learn_basis else basis_parameters(model)
    if step1_params is None:
        step1_params = coefficient_parameters(model) + bases
        if not step1_params:
            raise ValueError("fine_tune: the model has no BasisConv2d coefficients to train in step 1 "
                             "(compress it first, or pass step1_params, e.g. conv_weight_parameters(model))")
    common = dict(eval_fn=eval_fn, folder=folder, seed=seed, detect_anomaly=detect_anomaly, progress=progress,
                  extra_meta=extra_meta, distillation=distillation)
    basis_lr_scale = positive_number("basis_lr_scale", basis_lr_scale)
    freeze_all_but(model, step1_params)
    basis_ids = {id(p) for p in bases}
    groups = [{"params": [p for p in step1_params if id(p) not in basis_ids]},
              {"params": [p for p in step1_params if id(p) in basis_ids], "lr": lr1 * basis_lr_scale}]
    optimizer1 = optim.SGD([g for g in groups if g["params"]], lr=lr1, momentum=momentum, weight_decay=weight_decay)
    scheduler1 = optim.StepLR(optimizer1, step_size=lr1_step, gamma=0.1)
    history = list(Trainer(model, optimizer1, loader, epochs=epochs1, scheduler=scheduler1,
                                   stage="step1", **common).fit(resume=resume))
    if on_step_end is not None:
        on_step_end("step1", model)

    step2_params = freeze_all_but(model, non_conv_parameters(model))
    optimizer2 = optim.SGD(step2_params, lr=lr2, momentum=momentum, weight_decay=weight_decay)
    history += Trainer(model, optimizer2, loader, epochs=epochs2, stage="step2", **common).fit(resume=resume)
    if on_step_end is not None:
        on_step_end("step2", model)
    return history
