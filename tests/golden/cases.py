"""The reference builds checked byte for byte against tests/golden/<name>/."""

CASES = {
    "convnextv2_femto": [
        "cfg/models/ConvNeXtV2.yaml",
        "-p",
        "backbone=femto",
        "-p",
        "num_classes=10",
        "--loss",
        "cfg/losses/cls.yaml",
        "--metric",
        "cfg/metrics/topk.yaml",
    ],
    "soft_cls_loss": [
        "cfg/models/ConvNeXtV2.yaml",
        "-p",
        "backbone=atto",
        "-p",
        "num_classes=10",
        "-p",
        "targets=soft",  # the digits preset feeds the soft-target loss one-hot probabilities
        "--loss",
        "cfg/losses/soft_cls.yaml",
        "--name",
        "soft_cls_loss",
    ],
    "resnet18_digits": [  # another family: BatchNorm, projection shortcuts, an SGD backward
        "cfg/models/ResNet.yaml",
        "-p",
        "backbone=resnet18",
        "-p",
        "num_classes=10",
        "--name",
        "resnet18_digits",
    ],
    "vit_tiny_digits": [  # another family: tokens, a class token and a position embedding, AdamW
        "cfg/models/ViT.yaml",
        "-p",
        "backbone=tiny",
        "-p",
        "num_classes=10",
        "--name",
        "vit_tiny_digits",
    ],
    "tabularfusion": [  # two inputs (image, tabular), two outputs (cls, reg), a two-part loss, an image table
        "cfg/models/TabularFusion.yaml",
        "--name",
        "tabularfusion",
    ],
}
