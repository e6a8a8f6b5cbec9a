"""Fixed dimensions of tensorpack's ResNet-FPN Mask R-CNN that both networks share (docs/model-conventions.md)."""

RESNET_GROUP_WIDTHS = (64, 128, 256, 512)  # bottleneck widths of ResNet groups 0-3 (outputs are 4x these)
RESNET_GROUP_STRIDES = (4, 8, 16, 32)  # feature strides of C2..C5
SIZE_MULTIPLE = 32  # FPN.RESOLUTION_REQUIREMENT: every input side is padded to a multiple of this
BOX_RESOLUTION = 7  # RoIAlign output of the box head
MASK_RESOLUTION = 14  # RoIAlign output of the mask head
MASK_SIZE = 2 * MASK_RESOLUTION  # the mask head's output masks: its 2x2 stride-2 deconvolution doubles the RoIAlign
BN_EPSILON = 1e-5  # FrozenBN


def embedding_dim(fpn_channels: int, num_categories: int) -> int:
    """Length of an instance's search vector (modeling/embeddings.py): the FPN channels, then the class
    distribution, background included."""
    return fpn_channels + num_categories + 1
