"""How far a float32 evaluation of a gradient (or a loss) may be from the exact value, on any CPU.

Rounding model. IEEE 754 makes +, *, FMA, / and sqrt return the exact result of their operands times (1 + d) with
|d| <= u (u = 2^-24 in float32); exp/log/erf in PyTorch's CPU kernels are within a few ulps. What differs between an
Intel AVX-512 machine and an AMD AVX2 one, between BLAS kernels, blockings, FMA or not, threads, is the ORDER in which
the terms of each sum are added, hence which d occur, never their size or their number. So every bound below holds
for any summation order: it depends on the number of rounded terms and on their magnitudes only.

Loss values (`loss_tolerance`): a short chain (normalise, dot products, logsumexp, means) from exact inputs, bounded
in the worst case with Higham's gamma_n = n u / (1 - n u): a sum of n terms computed in ANY order is within
gamma_(n-1) * sum|terms| of the exact sum (Higham, Accuracy and Stability of Numerical Algorithms, 2nd ed., 3.1).

Gradients of a network (`reference`): the worst case is uninformative there (a gradient goes through ~10^4 rounded
terms and the temperature-scaled softmax, whose worst case is ~1e-2 relative), and the first-order rounding
analysis of deep chains is what the probabilistic bound of Higham & Mary (SIAM J. Sci. Comput. 41(5), 2019) and
Ipsen & Zhou (SIAM J. Sci. Comput. 42(6), 2020) is for: the rounding errors d are bounded by u and have mean zero
given what was computed before them (a martingale; no independence needed), so by Azuma-Hoeffding a first-order
error sum_e d_e c_e over the N rounding events that reach a value is below LAMBDA * u * sqrt(N) * max|c_e| except
with probability 2 exp(-LAMBDA^2 / 2) (1.6e-18 at LAMBDA = 9; times the ~10^6 elements checked, still < 1e-11).

What bounds each c_e, per gradient element g_ij = sum_k dY_ki X_kj (the final accumulation over the n rows k of
a layer's inputs X and output-gradients dY; a bias has X = 1, an embedding a one-hot X, LayerNorm's weight an
elementwise product):
- a rounding in that accumulation moves g_ij by at most u * sum_k |dY_ki X_kj|;
- a rounding upstream of it moves an operand row X_k (dY_k) by at most kappa * u * ||X_k||_inf (||dY_k||_inf):
  errors are charged at the scale of the row they land in (a row is a token's feature vector; LayerNorm, the
  residual stream, softmax rows and the loss's row normalisation keep errors at their row's scale), and
  kappa = 1 + 4 s charges the loss's conditioning: s = exp(logit_scale) multiplies a feature error into the logits,
  and a logit error e moves each softmax row by at most 2 e;
so every |c_e| <= kappa * U_ij with U_ij = sum_k (|dY_ki| ||X_k||_inf + ||dY_k||_inf |X_kj|), computed in float64
from the float64 pass, and tolerance_ij = LAMBDA * u * sqrt(N) * kappa * U_ij. N = n + D counts the rounding
events: the longest final accumulation n plus D, the summed lengths of every accumulation of the forward and
backward passes (every layer of both towers, the loss, the rank all-reduce): an over-count of any single path.
The row-scale charge is a model, not a theorem (the final accumulation alone, gamma_n sum|dY||X|, is NOT enough:
measured, upstream rounding exceeds it where dY ~ 0). On the machine these tests were written on (AMD EPYC, AVX2),
plain float32 autograd and the ZeRO engines use at most ~3% of the tolerance (~0.1% for most tensors), while a 2x
or 0.5x gradient, another batch's or stale weights' exceed it 5-15000x and a uniform 1% error up to 14x: see
tests/test_numerics.py.
"""
import copy
import math

import numpy as np
import torch
import torch.nn.functional as F

U16 = 2.0 ** -11
U32 = 2.0 ** -24
U64 = 2.0 ** -53
LAMBDA = 9.0


def gamma(n, u=U32):
    """Higham's worst-case constant: n roundings of relative size <= u compound to at most gamma(n)."""
    assert n * u < 1
    return n * u / (1 - n * u)


def loss_tolerance(scale, dims, weights, batch, u=U32, feature_error=0.0):
    """Worst-case |computed - exact| of MatryoshkaClipLoss's total from given features, for a batch of `batch`
    pairs at logit scale `scale` (the per-dim loss: dims=[m], weights=[1]).

    Per dim m: F.normalize's sum of m squares, sqrt and division give each coordinate a relative error
    <= gamma(m + 3); the dot product of two such unit vectors adds gamma(m) * sum|a_k b_k| <= gamma(m), the two
    perturbed inputs 2 gamma(m + 3) (Cauchy-Schwarz), `scale *` one more u: |d logit| <= scale * gamma(3 m + 8)
    (+ 2 * feature_error * scale when the features themselves are off by that relative error). Cross-entropy rows
    (logsumexp_j l_ij - l_ii) are 1-Lipschitz in each of the two terms: 2 |d logit|; computing them (subtract the
    row max, exp, sum of `batch` terms, log, subtract) adds gamma(batch + 4) * (2 scale + ln batch + 1); the mean
    of `batch` rows, the two directions and the weighted sum of dims add gamma(batch + len(dims) + 2) of the
    (<= 2 scale + ln batch) loss magnitudes."""
    total = 0.0
    for m, w in zip(dims, weights):
        logit_error = scale * (gamma(3 * m + 8, u) + 2 * feature_error)
        rounding = gamma(batch + 4, u) * (2 * scale + math.log(batch) + 1)
        magnitude = gamma(batch + len(dims) + 2, u) * (2 * scale + math.log(batch))
        total += abs(w) * (2 * logit_error + rounding + magnitude)
    return total


def siglip_loss_tolerance(scale, bias, dims, weights, batch, texts=None, u=U32, feature_error=0.0):
    """Worst-case |computed - exact| of MatryoshkaSigLipLoss's total (or open_clip's SigLipLoss per prefix) from
    given features: `batch` images against `texts` texts (default `batch`; the other ranks' texts included) at logit
    scale `scale` and bias `bias`.

    Per dim m, as in loss_tolerance: the cosines are within gamma(3 m + 8) of exact (and 2 feature_error more when
    the features are off by that relative error), so a logit s c + b is within s (gamma(3 m + 8) + 2 feature_error)
    plus the rounding of the product and the sum, gamma(2) (s + |b|) (|logit| <= s + |b|). Each
    pair's -log sigmoid(+-logit) is 1-Lipschitz in the logit, and computing it (min, exp, log1p, subtract: a few
    ulps each) adds gamma(8) (s + |b| + 1) of its value (<= s + |b| + log 2). The batch x texts pairs are summed
    in any order (gamma(batch texts) of the sum of their values) and divided by `batch`; with other ranks' texts
    the blocks' sums and the weighted sum over dims add gamma(texts + len(dims) + 2) of the per-dim magnitude
    (<= texts (s + |b| + 1))."""
    texts = texts or batch
    magnitude = texts * (scale + abs(bias) + 1)
    total = 0.0
    for m, w in zip(dims, weights):
        logit_error = scale * (gamma(3 * m + 8, u) + 2 * feature_error) + gamma(2, u) * (scale + abs(bias))
        pair_error = logit_error + gamma(8, u) * (scale + abs(bias) + 1)
        summation = gamma(batch * texts + texts + len(dims) + 2, u) * magnitude
        total += abs(w) * (texts * pair_error + summation)
    return total


def cosine_tolerance(dim, u=U32):
    """Worst-case |computed - exact| of the cosine of two dim-vectors, each L2-normalised then dotted in float: a
    norm (sum of squares, sqrt) and a division leave each coordinate within gamma(dim + 3) relative, so each unit
    vector moves by that much; the dot product of unit vectors adds gamma(dim) * sum|a_k b_k| <= gamma(dim); or the
    rows are dotted first and divided by their norms after, the same terms in another order:
    gamma(dim) + 2 gamma(dim + 3) <= gamma(3 dim + 6)."""
    return gamma(3 * dim + 6, u)


def float16_cosine_error(dim):
    """Storing a unit vector in float16 moves each coordinate by at most U16 relative (2^-25 absolute below
    float16's normal range); re-normalised, its cosine with any unit vector moves by at most twice its relative
    distance: 2 (U16 + 2^-25 sqrt(dim))."""
    return 2 * (U16 + 2.0 ** -25 * math.sqrt(dim))


def assert_top_k_within(ids, exact_scores, tolerance):
    """ids[q] are a best-k list of exact_scores[q] as computed with scores within `tolerance` of exact: distinct, and
    the r-th has an exact score within 2 * tolerance of the exact r-th best (order statistics move by at most the
    largest score error). With no near-ties that is: the same ids as the exact top-k."""
    best = -np.sort(-exact_scores, axis=1)[:, :ids.shape[1]]
    for q, row in enumerate(ids):
        assert len(set(row.tolist())) == len(row), (q, row)
        assert np.all(np.abs(exact_scores[q, row] - best[q]) <= 2 * tolerance), (q, row, exact_scores[q, row], best[q])


def update_tolerance(before, grad, lr):
    """SGD without momentum or decay, w - lr * g, is two roundings (one with FMA): |error| <= gamma(2) (|w| + lr|g|)."""
    return gamma(2) * (before.double().abs() + lr * grad.double().abs())


def row_scale(t):
    return t.abs().amax(-1, keepdim=True)


def outer_magnitude(x, dy):
    """U for g = dY^T X over rows k: sum_k |dY_k| ||X_k|| + ||dY_k|| |X_k| (an [out, in] matrix)."""
    x, dy = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
    return (dy.abs().T @ row_scale(x)) + (row_scale(dy).T @ x.abs())


def elementwise_magnitude(x, dy):
    """U for g = sum_k dY_k * X_k (LayerNorm's weight)."""
    x, dy = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
    return (dy.abs() * row_scale(x) + row_scale(dy) * x.abs()).sum(0)


def explicit_attention(mha, x, attn_mask):
    """nn.MultiheadAttention (batch_first, self-attention) written out, so that the in-projection's output and the
    attention output before out_proj are tensors whose gradients can be kept. Checked against the module."""
    batch, tokens, width = x.shape
    heads = mha.num_heads
    qkv = F.linear(x, mha.in_proj_weight, mha.in_proj_bias)
    q, k, v = (t.reshape(batch, tokens, heads, width // heads).transpose(1, 2) for t in qkv.chunk(3, -1))
    attended = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask).transpose(1, 2).reshape(x.shape)
    return qkv, attended, F.linear(attended, mha.out_proj.weight, mha.out_proj.bias)


class Recorder:
    """Hooks on a float64 model: what each parameter's final accumulation sums (operands kept with their
    gradients) and the accumulation lengths of every op."""

    def __init__(self, model):
        self.model, self.uses, self.lengths, self.rows = model, [], [], 0
        for module in model.modules():
            if isinstance(module, torch.nn.MultiheadAttention):
                module.register_forward_hook(self.on_attention, with_kwargs=True)
            elif isinstance(module, (torch.nn.Linear, torch.nn.LayerNorm, torch.nn.Conv2d, torch.nn.Embedding)):
                module.register_forward_hook(self.on_module)
        if hasattr(model, "visual") and hasattr(model, "encode_text"):
            self.hook_clip(model)

    def keep(self, t):
        t.retain_grad()
        return t

    def use(self, param, kind, x, y, view=None, transpose=False):
        """`param`'s gradient gets a sum over the rows of (x, view(y.grad)), y a kept tensor; kind: outer (dY^T X),
        elementwise (LayerNorm's weight), bias (X = 1; summed over the batch for embeddings), embedding (one-hot X)."""
        self.uses.append((param, kind, x, y, view or (lambda g: g), transpose))
        self.rows = max(self.rows, y.numel() // y.shape[1 if y.dim() == 4 else -1])  # the rows summed over

    def on_module(self, module, args, out):
        x, out = args[0], self.keep(out)
        if isinstance(module, torch.nn.Linear):
            self.use(module.weight, "outer", x, out)
            self.lengths.append(module.in_features + module.out_features)
        elif isinstance(module, torch.nn.LayerNorm):
            xhat = F.layer_norm(x.detach(), module.normalized_shape, eps=module.eps)
            self.use(module.weight, "elementwise", xhat, out)
            self.lengths.append(4 * x.shape[-1])  # mean, variance; their two row sums backward
        elif isinstance(module, torch.nn.Conv2d):
            patches = F.unfold(x.detach(), module.kernel_size, stride=module.stride).transpose(1, 2)
            self.use(module.weight, "outer", patches, out, view=lambda g: g.flatten(2).transpose(1, 2))
            self.lengths.append(patches.shape[-1] + module.out_channels)
        else:
            self.use(module.weight, "embedding", x, out)
        if getattr(module, "bias", None) is not None:
            self.use(module.bias, "bias", None, out, view=lambda g: g.movedim(1, -1) if g.dim() == 4 else g)

    def on_attention(self, module, args, kwargs, out):
        x = args[0]
        qkv, attended, new = explicit_attention(module, x, kwargs.get("attn_mask"))
        assert torch.allclose(new, out[0], rtol=0, atol=1e-9 * out[0].abs().max().item()), "explicit attention"
        self.use(module.in_proj_weight, "outer", x, self.keep(qkv))
        self.use(module.in_proj_bias, "bias", None, qkv)
        self.use(module.out_proj.weight, "outer", self.keep(attended), self.keep(new))
        self.use(module.out_proj.bias, "bias", None, new)
        width, tokens = x.shape[-1], x.shape[-2]
        head = width // module.num_heads
        # forward: in-proj, q.k, softmax sum, attention-weighted sum, out-proj; backward: the same sums plus dq, dk
        self.lengths.append(6 * width + 2 * head + 5 * tokens)
        return new, None

    def hook_clip(self, model):
        """open_clip CLIP's parameters used outside modules: class/positional embeddings and the projections."""
        visual, seen = model.visual, {}
        visual.ln_pre.register_forward_pre_hook(lambda m, a: seen.__setitem__("embeds", self.keep(a[0])))
        visual.ln_post.register_forward_hook(lambda m, a, out: seen.__setitem__("post", out))
        model.transformer.register_forward_pre_hook(lambda m, a: seen.__setitem__("tokens", self.keep(a[0])))
        model.ln_final.register_forward_hook(lambda m, a, out: seen.__setitem__("final", out))

        def on_visual(module, args, out):
            self.use(visual.positional_embedding, "bias", None, seen["embeds"])
            self.use(visual.class_embedding, "bias", None, seen["embeds"], view=lambda g: g[:, 0])
            self.use(visual.proj, "outer", seen["post"][:, 0], self.keep(out), transpose=True)
            self.lengths.append(sum(visual.proj.shape))
        visual.register_forward_hook(on_visual)
        encode_text = model.encode_text

        def encode_text_kept(text, normalize=False):
            features = self.keep(encode_text(text))
            self.use(model.positional_embedding, "bias", None, seen["tokens"])
            pooled = seen["final"][torch.arange(text.shape[0]), text.argmax(dim=-1)]
            self.use(model.text_projection, "outer", pooled, features, transpose=True)
            self.lengths.append(sum(model.text_projection.shape))
            return F.normalize(features, dim=-1) if normalize else features
        model.encode_text = encode_text_kept

    def magnitudes(self):
        """U per parameter (see the module docstring), after backward."""
        found = {}
        for param, kind, x, y, view, transpose in self.uses:
            x, dy = (x.detach() if x is not None else None), view(y.grad)
            if kind == "outer":
                u = outer_magnitude(x, dy)
                u = u.T if transpose else u
            elif kind == "elementwise":
                u = elementwise_magnitude(x, dy)
            elif kind == "embedding":
                dy = dy.reshape(-1, dy.shape[-1])
                u = torch.zeros_like(param).index_add_(0, x.reshape(-1), dy.abs() + row_scale(dy))
            else:  # summed over every leading (batch, token) dimension the parameter does not have
                u = (dy.abs() + row_scale(dy)).reshape(-1, *param.shape).sum(0)
            found[id(param)] = found.get(id(param), 0) + u.reshape(param.shape)
        return found


def count_events(recorder, image, dims, ranks=1, micro_batches=1, sigmoid=False):
    """N of the module docstring, after a forward pass the recorder saw (`image`: its image features): the longest
    final accumulation plus the summed lengths of every accumulation of the forward and backward passes."""
    batch = image.shape[0]
    if sigmoid:
        # per dim: normalise (m forward, m backward), logits (m forward; B for each of the two feature
        # gradients), the sum over all B^2 pairs (forward)
        loss_length = sum(3 * m + 2 * batch + batch * batch for m in dims) + 2 * image.shape[-1] + len(dims)
    else:
        # per dim: normalise (m forward, m backward), logits (m forward; B for each of the two feature gradients),
        # cross-entropy (B forward, B backward); features normalised at full width in CLIP (forward and backward)
        loss_length = sum(3 * m + 4 * batch for m in dims) + 2 * image.shape[-1] + len(dims)
    n = max(recorder.rows, batch) + ranks + micro_batches
    return n + sum(recorder.lengths) + loss_length + ranks + micro_batches


def rounding_events(model, inputs, dims, sigmoid=False):
    """count_events for `model(*inputs)` on one process, from a float64 forward pass only (the count depends on
    the shapes, not on the weights or the inputs' values)."""
    model = copy.deepcopy(model).double()
    recorder = Recorder(model)
    image = model(*[x.double() if x.is_floating_point() else x for x in inputs])[0]
    return count_events(recorder, image, dims, sigmoid=sigmoid)


def reference(model, inputs, loss_fn, dims, weights, ranks=1, micro_batches=1, sigmoid=False):
    """Float64 gradients of `loss_fn(*model(*inputs))[0]` (model and inputs cast to double) and, per element, the
    tolerance of any float32 evaluation of them (module docstring). `model(*inputs)` returns (image features, text
    features, exp(logit_scale)), and logit_bias with `sigmoid` (the SigLIP loss); the features are rows of the
    joined batch of `ranks` ranks (gathered or exchanged features, DDP/ZeRO all-reduce) accumulated over
    `micro_batches`. Returns ({name: gradient}, {name: tolerance}, info)."""
    model = copy.deepcopy(model).double()
    inputs = [x.double() if x.is_floating_point() else x for x in inputs]
    recorder = Recorder(model)
    outputs = model(*inputs)
    total, _ = loss_fn(*outputs)
    total.backward()

    image, scale = outputs[0], outputs[2]
    batch, s = image.shape[0], float(scale.detach().reshape(-1)[0])
    b = float(outputs[3].detach().reshape(-1)[0]) if sigmoid else 0.0
    events = count_events(recorder, image, dims, ranks, micro_batches, sigmoid)
    # a sigmoid's output moves by at most e / 4 <= 2 e for a logit error e, and the bias's addition rounds at |b|
    kappa = 1 + 4 * (s + abs(b))
    factor = LAMBDA * U32 * math.sqrt(events) * kappa
    found = recorder.magnitudes()
    logit_scale, weight_sum = model.logit_scale, sum(abs(w) for w in weights)
    if sigmoid:
        # d total / d theta = s * sum_m sum_ij dA_ij cos_ij over B^2 pairs with |dA_ij| <= w_m / B and |cos| <= 1:
        # both terms of U are <= s w_m B; logit_bias's the same without s
        found[id(logit_scale)] = torch.full_like(logit_scale, s * weight_sum * 2 * batch)
        found[id(model.logit_bias)] = torch.full_like(model.logit_bias, weight_sum * 2 * batch)
    else:
        # logit_scale: d total / d theta = s * sum_m sum_ij dA_ij cos_ij with sum|dA| <= 2 w_m, |cos| <= 1 and
        # row scales ||dA_i|| <= w_m / B: U <= s * sum_m w_m (2 + B)
        found[id(logit_scale)] = torch.full_like(logit_scale, s * weight_sum * (2 + batch))
    grads, tolerances = {}, {}
    for name, param in model.named_parameters():
        grads[name] = param.grad if param.grad is not None else torch.zeros_like(param)
        tolerances[name] = factor * found.get(id(param), torch.zeros_like(param))
    info = {"events": events, "kappa": kappa, "factor": factor, "logit_scale": s, "logit_bias": b}
    return grads, tolerances, info


def ratios(got, grads, tolerances):
    """max |got - reference| / tolerance per parameter; where the tolerance is 0 (an embedding row no sample
    uses) the gradient must be exactly 0 (inf otherwise)."""
    out = {}
    for name, ref in grads.items():
        err = (got[name].double().reshape(ref.shape) - ref).abs()
        tol = tolerances[name]
        if bool((err[tol == 0] > 0).any()):
            out[name] = math.inf
        else:
            out[name] = float((err[tol > 0] / tol[tol > 0]).max()) if bool((tol > 0).any()) else 0.0
    return out


def assert_gradients_within(got, grads, tolerances, label=""):
    """Every element of every parameter within its tolerance; returns the worst ratio (<= 1)."""
    found = ratios(got, grads, tolerances)
    over = {name: r for name, r in found.items() if r > 1}
    assert not over, f"{label}: gradients outside the float32 rounding bound (error / bound): {over}"
    return max(found.values())
