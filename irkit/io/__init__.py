"""Image input: decoding, cropping, resizing and tensor conversion."""
from irkit.io.images import (DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, InputSpec, crop_bbx, decode_image_bytes,
                             load_image, resize_max_side, resize_scale, to_tensor)

__all__ = ["DEFAULT_MAX_PIXELS", "IMAGE_EXTENSIONS", "InputSpec", "crop_bbx", "decode_image_bytes", "load_image",
           "resize_max_side", "resize_scale", "to_tensor"]
