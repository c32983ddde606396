"""Defaults that the command line needs before any model code loads (no torch here).

The library modules read their defaults from here too (and keep their public names:
``vestis.detect.DEFAULT_PARSER``, ``vestis.models.encoder.BATCH_SIZE``...), so a command-line
default and the library's are one constant.
"""

#: The trained default (configs/vestis-lite0.yaml): Lite0 stages 5-6 fine-tuned plus a head, fp16.
DEFAULT_MODEL = "vestis-lite0"
#: The shipped garment parser (configs/parser-lite0.yaml).
DEFAULT_PARSER = "parser-lite0"
#: The shipped attribute and category heads (configs/attributes.yaml).
DEFAULT_ATTRIBUTE_MODEL = "attributes-lite0"
#: The shipped outfit model (configs/compnet.yaml).
DEFAULT_OUTFIT_MODEL = "compnet-lite0"
#: The encoder that links a video's garments across frames (plain ImageNet features).
LINK_MODEL = "lite0"
#: The default images per inference batch; small batches keep ONNX Runtime in cache.
BATCH_SIZE = 16
#: Images per batch when ``vestis eval`` embeds a whole benchmark set (throughput, not latency).
EVAL_BATCH_SIZE = 32
#: Keep every Nth decoded frame of a video (Video2Shop samples every 25th).
DEFAULT_EVERY = 25
