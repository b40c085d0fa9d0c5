"""Class-conditional Gaussian statistics of earlier layers, read in the same forward pass.

Near the decision boundary the output layer of an adversarial looks like that of a hard clean
image (both are unsure); what separates them sits earlier in the network, where the perturbation
has moved the activations away from those of any clean image of the predicted class (Lee et al.,
"A simple unified framework for detecting out-of-distribution samples and adversarial attacks",
2018).  Forward hooks on a few ``nn.Conv2d`` layers spread over the depth, and on the output
layer's input φ, collect channel means of each; :class:`LayerGaussians` keeps one mean per class
and one shared covariance per layer, fitted on clean training images, and scores an input by the
Mahalanobis distance of each layer's activations to its predicted class.  No extra pass: the
hooks read what the prediction computes anyway.

With ``with_means=True`` the rows also carry the channel means themselves.  A distance to the
predicted class asks "is this unlike a clean image of its class?"; an attack also moves the
activations in directions of its own (the gradient's), which a linear model on the means picks up
where the distance, averaged over every direction, does not.  On the CIFAR-10 CNN that more than
doubled the share of FGSM and margin-capped adversarials caught at a 5% target false-positive rate
(docs/RESULTS.md).

With ``with_agreement=True`` each layer also says whether it agrees with the output: how much
farther its activations are from the predicted class than from the nearest class (the layer-wise
consistency of Papernot and McDaniel's deep k-nearest neighbours, with class means instead of
neighbours).  The hope was that an attack flipping the output in one step leaves the earlier layers
on the true class while noise leaves them agreeing; on a CIFAR-10 WRN-16-2 it added a few points on
the attacks that stop at the boundary and almost none on FGSM (docs/RESULTS.md).

With ``gram_probes`` (:func:`gram_layers`: the first conv and the first probe) the statistics also cover
each of those layers' Gram matrix, the mean over space of every pair of channels' product (the
co-activations that describe an image's texture; Sastry and Oore, "Detecting out-of-distribution
examples with Gram matrices", 2020).  A perturbation spread over every pixel, as one-step and
small-budget attacks are, changes the texture the first layers see more than it changes any channel's
mean; the upper triangle of each Gram matrix is scored like a channel-mean vector, by its distance to
the predicted class and, with ``with_means``, as columns of its own.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from .features import (
    Analysis,
    _stat_dtype,
    analysis_from,
    analyze,
    detector_features,
    eval_mode,
    find_last_linear,
)

__all__ = ["EVERY_CONV", "LayerGaussians", "feature_rows", "forward_probed", "gaussians_for", "gram_layers",
           "probe_layers", "probes_in_words"]

#: A probe count that reads every ``nn.Conv2d`` of the model.
EVERY_CONV = -1


def probe_layers(model: nn.Module, count: int = 3) -> list[str]:
    """Names of up to ``count`` ``nn.Conv2d`` modules at 1/count, 2/count, … 1 of the conv depth
    (rounded, repeats merged): the last conv always, the first ones, which see edges more than
    classes, only in shallow networks with few convs.  The small CNN's three convs give the second
    and the third; a WRN-28-4's 28 give the last conv of each of its three groups.  The residual
    block's output, which adds the skip connection to that conv's, was tried in its place and caught
    no more on a CIFAR-10 WRN-16-2 and less on a pretrained ResNet-20 (FGSM, PGD at 2/255, noise).
    :data:`EVERY_CONV` names every conv, in the order the model defines them."""
    convs = [name for name, module in model.named_modules() if isinstance(module, nn.Conv2d)]
    if not convs or count == EVERY_CONV:
        return convs
    picks = np.unique(np.round(np.linspace(0, len(convs) - 1, count + 1)[1:]).astype(int))
    return [convs[i] for i in picks]


def probes_in_words(count: int, layers: str = "convolutions") -> str:
    """How many layers a probe count reads, for reports: "every convolution", or "up to 3 convolutions"
    (``layers`` names what the count counts)."""
    return "every convolution" if count == EVERY_CONV else f"up to {count} {layers}"


#: Gram matrices are read only from layers with at most this many channels: the upper triangle of C
#: channels is C(C+1)/2 columns (2,080 for 64), and its precision matrix is stored in the bundle.
GRAM_MAX_CHANNELS = 64

#: What :func:`gram_layers` picks, in words, for reports and help texts.
GRAM_LAYERS_IN_WORDS = "the Gram matrices of the first conv and the first probed layer"


def gram_layers(model: nn.Module, probes: Sequence[str]) -> list[str]:
    """The layers whose Gram matrices :class:`LayerGaussians` reads: the first ``nn.Conv2d`` (the
    stem, which sees the pixels' texture) and the first of ``probes``, each only if it has at most
    :data:`GRAM_MAX_CHANNELS` output channels."""
    convs = {name: module for name, module in model.named_modules() if isinstance(module, nn.Conv2d)}
    names = dict.fromkeys([*list(convs)[:1], *probes[:1]])
    return [n for n in names if n in convs and convs[n].out_channels <= GRAM_MAX_CHANNELS]


def _gram_upper(output: torch.Tensor) -> torch.Tensor:
    """``[N, C(C+1)/2]``: the upper triangle of each image's Gram matrix ``F Fᵀ / HW`` of its ``[C, HW]``
    activations, in float32 or better whatever precision the model runs in."""
    dtype = _stat_dtype(output)
    with torch.autocast(output.device.type, enabled=False):
        f = output.flatten(2).to(dtype)
        gram = f @ f.transpose(1, 2) / f.shape[2]
    rows, cols = torch.triu_indices(gram.shape[1], gram.shape[1], device=gram.device)
    return gram[:, rows, cols]


#: On a CPU, max(0, ·) is taken over blocks of at most this many elements of a layer's output (16 MiB in
#: float32).  A larger temporary is fresh memory that the C allocator maps and the system zeroes on every
#: batch (glibc maps every block above 32 MiB afresh), which cost more than the clipping itself: on a
#: WRN-28-4 at batch 256, 12% of the forward pass against 1–3% in blocks.  Smaller outputs, as at batch
#: 32, are clipped whole: splitting them only added calls.
_CPU_BLOCK_ELEMENTS = 1 << 22


def _channel_means(output: torch.Tensor, rectified: bool) -> torch.Tensor:
    """``[N, C]``: the mean over space of each channel of ``output`` (``[N, C, ...]``; ``[N, C]`` is
    returned as it is), of max(0, ·) of it when ``rectified``."""
    if output.ndim <= 2:
        return output.clamp_min(0) if rectified else output
    # Averaged in the statistics' dtype, float32 or better, when the model runs in bfloat16 or float16.
    dtype = _stat_dtype(output)
    if not rectified:
        return output.flatten(2).mean(dim=2, dtype=dtype)
    # An accelerator's caching allocator reuses the temporary: no blocks there.
    if output.device.type != "cpu" or output.numel() <= _CPU_BLOCK_ELEMENTS:
        return output.clamp_min(0).flatten(2).mean(dim=2, dtype=dtype)
    rows = max(1, _CPU_BLOCK_ELEMENTS // output[0].numel())
    return torch.cat([block.clamp_min(0).flatten(2).mean(dim=2, dtype=dtype) for block in output.split(rows)])


def forward_probed(model: nn.Module, x: torch.Tensor, probes: Sequence[str], layer: str | None = None,
                   gram_probes: Sequence[str] = (), rectified: bool = False):
    """One forward pass: ``(logits, phi, [channel means of each probe, [N, C]] + [the upper triangle of
    each gram probe's Gram matrix, [N, C(C+1)/2]])``.  With ``rectified`` the channel means are those
    of each probe's output clipped at zero, max(0, ·).

    Each probe's output ``[N, C, H, W]`` is reduced over space as the pass goes, so nothing larger
    than ``[N, C]`` (``[N, C²]`` for a Gram matrix) is kept per layer.  Gradients flow through
    everything (adaptive attacks use it).
    """
    linear = find_last_linear(model, layer)
    captured: dict[tuple[str, str], torch.Tensor] = {}
    phi: list[torch.Tensor] = []
    wanted = [(name, "mean") for name in probes] + [(name, "gram") for name in gram_probes]
    # Every name is resolved before any hook goes on, so an unknown one leaves the model as it was.
    modules = {name: model.get_submodule(name) for name in dict.fromkeys(n for n, _ in wanted)}
    handles = [linear.register_forward_pre_hook(lambda _m, inputs: phi.append(inputs[0]))]
    for name, module in modules.items():

        def hook(_m, _inputs, output, name=name):
            if (name, "mean") in wanted:
                captured[name, "mean"] = _channel_means(output, rectified)
            if (name, "gram") in wanted:
                captured[name, "gram"] = _gram_upper(output)

        handles.append(module.register_forward_hook(hook))
    try:
        logits = model(x)
    finally:
        for handle in handles:
            handle.remove()
    missing = [name for name, what in wanted if (name, what) not in captured]
    if missing or not phi:
        raise RuntimeError(f"layers {missing or [layer or 'output']} were not called in the forward pass")
    return logits, phi[-1].flatten(1), [captured[key] for key in wanted]


def _full_precision(method):
    """Runs a scoring method with autocast off: its products stay in the statistics' dtype (float32 or
    better) when the model ran under autocast, which would otherwise take them in bfloat16 or float16."""
    @functools.wraps(method)
    def scored(self, acts, phi, *args, **kwargs):
        with torch.autocast(phi.device.type, enabled=False):
            return method(self, acts, phi, *args, **kwargs)
    return scored


#: Each fitted :class:`LayerGaussians`' statistics as tensors, per (dtype, device): converted (and
#: copied to an accelerator) once, not on every batch, and again when ``means_`` or ``precisions_`` are
#: replaced (by :meth:`LayerGaussians.fit` or by hand; arrays edited in place are not noticed).  Kept
#: outside the object so that a bundle stores only its plain arrays.
_AS_TENSORS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class LayerGaussians:
    """Per layer: a mean per class and one shared covariance of the activations of clean images.

    Plain arrays only (``means_``, ``precisions_``), so a bundle can store them as numbers; they follow
    the order of :func:`forward_probed`'s vectors and then φ.  ``with_means`` appends each of those
    vectors (channel means, Gram triangles, φ) to the distances in :meth:`rows`.  ``rectified`` reads
    each probe's channel means after max(0, ·) (:func:`forward_probed`).
    """

    with_means = False  # statistics saved before the option existed read this default
    with_agreement = False  # the same
    gram_probes: Sequence[str] = ()  # the same
    rectified = False  # the same

    def __init__(self, probes: Sequence[str], layer: str | None = None, ridge: float = 1e-3,
                 with_means: bool = False, with_agreement: bool = False, gram_probes: Sequence[str] = (),
                 rectified: bool = False):
        self.probes = list(probes)
        self.layer = layer
        self.ridge = ridge
        self.with_means = with_means
        self.with_agreement = with_agreement
        self.gram_probes = list(gram_probes)
        self.rectified = rectified

    def forward(self, model: nn.Module, x: torch.Tensor):
        """:func:`forward_probed` on the layers these statistics read."""
        return forward_probed(model, x, self.probes, self.layer, self.gram_probes, self.rectified)

    @torch.no_grad()
    def fit(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 256):
        """Fit on clean ``images`` (``[N, C, H, W]`` in [0, 1]) the model classifies as ``labels`` (read in
        eval mode; the model's mode is restored)."""
        with eval_mode(model):
            return self._fit(model, images, labels, batch_size)

    def _fit(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int):
        device = next(model.parameters()).device
        k = 0  # classes: the model's logits, so that every class it can predict has a mean row
        rows: list[list[torch.Tensor]] = []
        ys = []
        for start in range(0, len(images), batch_size):
            x = images[start:start + batch_size].to(device)
            y = labels[start:start + batch_size]
            logits, phi, acts = self.forward(model, x)
            k = logits.shape[1]
            keep = (logits.argmax(1).cpu() == y)
            feats = [a.double().cpu()[keep] for a in [*acts, phi]]
            rows.append(feats)
            ys.append(y[keep])
        if not rows:
            raise ValueError("no images to fit the layer statistics on")
        y = torch.cat(ys)
        if len(y) < 2:
            raise ValueError("the model classifies fewer than two of the reference images correctly")
        self.means_, self.precisions_ = [], []
        for i in range(len(rows[0])):
            feats = torch.cat([r[i] for r in rows])
            means = torch.zeros(k, feats.shape[1], dtype=torch.float64)
            centred = torch.empty_like(feats)
            for c in torch.unique(y).tolist():
                sel = y == c
                means[c] = feats[sel].mean(dim=0)
                centred[sel] = feats[sel] - means[c]
            cov = centred.T @ centred / max(len(feats) - 1, 1)
            ridge = self.ridge * cov.diagonal().mean().clamp_min(1e-12)
            precision = torch.linalg.inv(cov + ridge * torch.eye(cov.shape[0], dtype=torch.float64))
            self.means_.append(means.numpy())
            self.precisions_.append(precision.numpy())
        self.n_fit_ = int(len(y))
        return self

    @property
    def n_features(self) -> int:
        """Columns of :meth:`rows`: one distance per probe, gram probe and φ, then as many agreement gaps
        when ``with_agreement``, then their vectors' columns when ``with_means``."""
        n = len(self.probes) + len(self.gram_probes) + 1
        if self.with_agreement:
            n *= 2
        if self.with_means:
            n += sum(int(m.shape[1]) for m in self.means_)
        return n

    def rows(self, acts: Sequence[torch.Tensor], phi: torch.Tensor, predicted: torch.Tensor) -> torch.Tensor:
        """``[N, n_features]``: :meth:`distances` to the predicted class, followed by :meth:`agreement`
        when ``with_agreement`` and by the vectors of every probe and φ when ``with_means``.
        Differentiable in the activations."""
        if self.with_agreement:
            out = torch.cat(self._predicted_and_gap(acts, phi, predicted), dim=1)
        else:
            out = self.distances(acts, phi, predicted)
        if self.with_means:
            out = torch.cat([out, *(a.to(out.dtype) for a in [*acts, phi])], dim=1)
        return out

    def _statistics(self, dtype: torch.dtype, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``(means, precision)`` of each probe's vector and φ as tensors of ``dtype`` on ``device``."""
        return self._cached((dtype, device), lambda: [
            tuple(torch.as_tensor(a, dtype=dtype, device=device) for a in pair)
            for pair in zip(self.means_, self.precisions_, strict=True)])

    def _by_width(self, dtype: torch.dtype, device: torch.device):
        """``(groups, order)``: per width d, ``(positions, means [L, k, d], precisions [L, d, d])`` of the
        L vectors of that width (their positions in :func:`forward_probed`'s order, then φ), and the
        permutation that puts the groups' stacked rows back in that order (``None`` where they already are
        in it: widths that only grow with depth, as in most networks)."""
        def build():
            widths: dict[int, list[int]] = {}
            for i, means in enumerate(self.means_):
                widths.setdefault(int(np.shape(means)[1]), []).append(i)
            groups = [(positions,
                       torch.as_tensor(np.stack([self.means_[i] for i in positions]), dtype=dtype, device=device),
                       torch.as_tensor(np.stack([self.precisions_[i] for i in positions]), dtype=dtype, device=device))
                      for positions in widths.values()]
            stacked = [i for positions in widths.values() for i in positions]
            in_order = stacked == sorted(stacked)
            return groups, None if in_order else torch.as_tensor(np.argsort(stacked), device=device)

        return self._cached(("by width", dtype, device), build)

    def _cached(self, key, build):
        """``build()``, made once per ``key`` and again after a refit replaced the statistics."""
        cache = _AS_TENSORS.setdefault(self, {})
        source = tuple(map(id, [*self.means_, *self.precisions_]))
        cached = cache.get(key)
        if cached is None or cached[0] != source:
            with torch.inference_mode(False):  # plain tensors, usable by attacks that differentiate
                built = build()
            # The arrays are kept alive with their ids, so that an id cannot be reused by a new array.
            cached = cache[key] = (source, built, [*self.means_, *self.precisions_])
        return cached[1]

    @_full_precision
    def distances(self, acts: Sequence[torch.Tensor], phi: torch.Tensor,
                  predicted: torch.Tensor | None) -> torch.Tensor:
        """``[N, len(means_)]``: log(1 + squared Mahalanobis distance) of each probe's vector and of φ to the predicted
        class's mean, or with ``predicted=None`` to the nearest class mean (Lee et al.'s score).
        Differentiable in the activations."""
        dtype = _stat_dtype(phi)
        vectors = [*acts, phi]
        if predicted is None:
            out = []
            for values, (m, p) in zip(vectors, self._statistics(dtype, phi.device), strict=True):
                diff = values.to(dtype)[:, None, :] - m[None]  # [N, k, d]
                out.append(torch.einsum("nkd,de,nke->nk", diff, p, diff).min(dim=1).values)
            d2 = torch.stack(out, dim=1)
        else:
            # The vectors of one width are scored together, a batched product per width instead of
            # one per layer: on an accelerator at small batches every operation is a kernel launch,
            # and a network repeats few widths over many layers (a WRN-28-4's 28 convs have four).
            groups, order = self._by_width(dtype, phi.device)
            parts = []
            for positions, m, p in groups:
                if len(positions) > 1:
                    values = torch.stack([vectors[i] for i in positions])
                else:
                    values = vectors[positions[0]][None]
                diff = values.to(dtype) - m[:, predicted]  # [L, N, d]
                parts.append((torch.bmm(diff, p) * diff).sum(dim=2))  # [L, N]
            d2 = torch.cat(parts) if len(parts) > 1 else parts[0]
            d2 = (d2 if order is None else d2[order]).T
        return torch.log1p(d2.clamp_min(0))

    def agreement(self, acts: Sequence[torch.Tensor], phi: torch.Tensor, predicted: torch.Tensor) -> torch.Tensor:
        """``[N, len(means_)]``: how much farther each probe's (and φ's) activations are from the predicted
        class than from their nearest class, log(1 + d²_predicted) − log(1 + d²_nearest) ≥ 0: 0 where
        the layer agrees with the output.  Differentiable in the activations."""
        return self._predicted_and_gap(acts, phi, predicted)[1]

    @_full_precision
    def _predicted_and_gap(self, acts, phi, predicted) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`distances` to the predicted class and :meth:`agreement`, from one set of squared
        distances to every class: ‖(v − m_c) U‖² with U the Cholesky factor of the precision, so
        that each distance costs O(d), not O(d²)."""
        dtype = _stat_dtype(phi)
        dist, gap = [], []
        for values, (factor, m_factor, fitted) in zip([*acts, phi], self._factored(dtype, phi.device), strict=True):
            z = values.to(dtype) @ factor
            d2 = (z[:, None, :] - m_factor[None]).square().sum(dim=2)  # [N, k]
            to_predicted = torch.log1p(d2.gather(1, predicted[:, None].to(d2.device)).squeeze(1))
            nearest = d2.masked_fill(~fitted, float("inf")).min(dim=1).values
            dist.append(to_predicted)
            gap.append((to_predicted - torch.log1p(nearest)).clamp_min(0))
        return torch.stack(dist, dim=1), torch.stack(gap, dim=1)

    def _factored(self, dtype: torch.dtype, device: torch.device) -> list[tuple[torch.Tensor, ...]]:
        """``(U, means @ U, fitted)`` per probe's vector and φ: U the precision's Cholesky factor, ``fitted``
        the classes that have a mean (a class no reference image stood for has a row of zeros)."""
        def build():
            factors = []
            for means, precision in zip(self.means_, self.precisions_, strict=True):
                means = np.asarray(means, dtype=np.float64)
                chol = np.linalg.cholesky(np.asarray(precision, dtype=np.float64))  # P = U Uᵀ
                factors.append((torch.as_tensor(chol, dtype=dtype, device=device),
                                torch.as_tensor(means @ chol, dtype=dtype, device=device),
                                torch.as_tensor(np.abs(means).sum(axis=1) > 0, device=device)))
            return factors

        return self._cached(("factored", dtype, device), build)


def gaussians_for(detector, model: nn.Module, layer: str | None = None) -> LayerGaussians:
    """Unfitted statistics of the layers ``detector`` (an :class:`~detector.UncannyValleyDetector`)
    probes in ``model``, with the columns it reads."""
    probes = probe_layers(model, detector.probes)
    return LayerGaussians(probes, layer, with_means=detector.probe_means, with_agreement=detector.probe_agreement,
                          gram_probes=gram_layers(model, probes) if detector.probe_gram else (),
                          rectified=detector.probe_rectified)


def feature_rows(model: nn.Module, x: torch.Tensor, *, feature_set: str, weight_norm: float,
                 layer: str | None = None, gaussians: LayerGaussians | None = None,
                 grad: bool = False) -> tuple[torch.Tensor, Analysis]:
    """The detector's feature rows ``[N, F]`` for a batch, and the pass's :class:`Analysis`: the
    output-layer feature set, followed by the earlier layers' :meth:`LayerGaussians.rows` when
    ``gaussians`` is given.

    One forward pass, no gradients unless ``grad`` (for attacks that follow the features).
    """
    if gaussians is None and not grad:
        out = analyze(model, x, layer)
        return detector_features(feature_set, out.logits, out.phi_sq, weight_norm), out
    with eval_mode(model), torch.enable_grad() if grad else torch.inference_mode():
        if gaussians is not None:
            logits, phi, acts = forward_probed(model, x, gaussians.probes, layer, gaussians.gram_probes,
                                               gaussians.rectified)
        else:
            logits, phi, acts = forward_probed(model, x, [], layer)
        out = analysis_from(logits, phi, find_last_linear(model, layer).weight)
        rows = detector_features(feature_set, out.logits, out.phi_sq, weight_norm)
        if gaussians is not None:
            rows = torch.cat([rows, gaussians.rows(acts, phi, out.predictions).to(rows.dtype)], dim=1)
    return rows, out
