"""The claims the lab tests, in the project's own words (ids as in CLAIMS.md), each with a short
explanation for a student and the experiment that tests it (or will)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Claim:
    id: str
    text: str  # the claim, in our words
    explanation: str  # what it means and how we look at it, for a student
    experiments: tuple[str, ...]  # the experiments that test it, or will


CLAIM_LIST = (
    Claim(
        "C1",
        "A network with batch norm gets to a given accuracy in fewer training steps.",
        "Training is a long walk downhill on the loss. The claim is that normalizing each "
        "layer's inputs makes the walk shorter: a network with BN reaches the same accuracy "
        "after fewer updates. We count the updates each network needs to reach a fixed "
        "accuracy, each at the learning rate that suits it best.",
        ("convergence", "ioffe-mnist"),
    ),
    Claim(
        "C2",
        "Batch norm lets training run at larger learning rates before it breaks down.",
        "The learning rate is the size of each step. Too large and training blows up or stalls. "
        "The claim is that BN keeps the layers' signals at a steady scale, so much larger steps "
        "stay safe. We raise the rate until each network stops learning and compare where "
        "that happens.",
        ("learning-rate",),
    ),
    Claim(
        "C3",
        "Batch norm keeps the distribution of each layer's inputs steadier while the earlier "
        "layers learn (less internal covariate shift).",
        "Each layer learns while the layers below it keep changing what they feed it, as if "
        "its data kept moving. BN was introduced to pin down the mean and spread of those "
        "inputs. We watch the inputs of one layer's units late in training and measure how much "
        "they still wander, relative to their own spread.",
        ("ioffe-mnist", "ics"),
    ),
    Claim(
        "C4",
        "Batch norm makes the loss landscape smoother, so training is better behaved.",
        "A smooth landscape means the slope you measure here still holds a little further on, "
        "so a step in that direction does what you expected. The claim is that BN makes the "
        "loss and its gradient change more gently along the path training takes.",
        ("smoothness",),
    ),
    Claim(
        "C5",
        "Batch norm regularizes: the gap between training and test accuracy shrinks, and it "
        "can take the place of dropout.",
        "A network that memorizes its training examples does better on them than on new ones; "
        "that gap is overfitting. Because each example is normalized with the statistics of a "
        "random batch, BN adds a little noise, which might curb memorizing the way dropout does. "
        "We compare the train/test gaps, and BN alone against dropout alone.",
        ("regularization",),
    ),
    Claim(
        "C6",
        "With batch norm the outcome depends much less on how large the initial weights are.",
        "Before training, weights are drawn at random at some scale. Too small and signals fade "
        "layer by layer; too large and they explode. BN rescales every layer's output anyway, so "
        "the starting scale might matter less. We start from scales 100 times apart and see how "
        "much the final accuracy varies.",
        ("init",),
    ),
    Claim(
        "C7",
        "Batch norm improves gradient flow, easing vanishing and exploding gradients.",
        "The learning signal travels backwards through the layers; if it shrinks or grows at "
        "each one, the first layers learn nothing or too wildly. The claim is that BN keeps it "
        "at a steady size.",
        ("gradients",),
    ),
    Claim(
        "C8",
        "Batch norm makes (much) deeper networks trainable.",
        "Stacking more layers makes training harder. The claim is that BN lets far deeper "
        "plain networks train; a published analysis warns of the opposite in very deep ones "
        "without skip connections.",
        ("depth",),
    ),
    Claim(
        "C9",
        "Batch norm gets worse when batches are small, because the statistics of a few examples "
        "are noisy.",
        "BN normalizes with the mean and spread of the current batch. With two examples those "
        "are guesses from two numbers, and the network also learns to rely on them, then meets "
        "different (population) statistics at test time. Norms that do not use the batch, such "
        "as LayerNorm and GroupNorm, should not suffer. We shrink the batch and compare the loss "
        "of accuracy.",
        ("batch-size",),
    ),
    Claim(
        "C10",
        "Batch norm is awkward in recurrent networks.",
        "A recurrent network applies the same layer at every time step, but the statistics "
        "differ from step to step and sequences differ in length. The claim is that BN needs "
        "special care there (separate statistics per step), where LayerNorm does not.",
        ("recurrent",),
    ),
    Claim(
        "C11",
        "Where BN goes matters: one source puts it after the linear transform and before the "
        "activation, another after the activation.",
        "The two placements normalize different quantities: the input of the nonlinearity or "
        "its output. The sources disagree on which is right; an experiment can compare them.",
        ("placement",),
    ),
    Claim(
        "C12",
        "At inference BN uses population statistics, so training and evaluation behave "
        "differently.",
        "During training BN uses each batch's statistics; at test time it uses running averages "
        "gathered during training. If those averages are off, the network behaves worse at test "
        "time than in training.",
        ("inference",),
    ),
    Claim(
        "C13",
        "BN adds computational overhead in training and inference.",
        "Computing statistics and normalizing costs time. At inference the normalization can be "
        "folded into the preceding layer's weights, which should remove the cost.",
        ("overhead",),
    ),
    Claim(
        "C14",
        "BN's momentum and epsilon are hyperparameters that need tuning.",
        "Momentum sets how fast the running statistics follow the batches; epsilon keeps the "
        "division safe. The claim is that their values matter enough to tune.",
        ("hyperparameters",),
    ),
    Claim(
        "C15",
        "One of the sources says batch norm copes with any batch size, which contradicts C9; "
        "here it is tested directly.",
        "This is C9's opposite. It is judged on the same measure with the opposite side of the "
        "same threshold, so C9 and C15 can never both be supported: at most one of them is.",
        ("batch-size",),
    ),
)

CLAIMS: dict[str, str] = {claim.id: claim.text for claim in CLAIM_LIST}
CLAIM_BY_ID: dict[str, Claim] = {claim.id: claim for claim in CLAIM_LIST}
