"""Per-source data readers behind cm_jax.input_pipeline (the one module the rest of cm_jax calls).

catalog.py       the table of supported datasets and image_shape(data_config) (standard library only)
dataset.py       the Dataset interface (num_examples, image_shape, num_classes, fingerprint, get), in-memory arrays
idx.py           MNIST-family IDX files
mnist_family.py  MNIST and Fashion-MNIST: which source serves a split (IDX files or TFDS), padding
tfds_source.py   TFDS: RGB builders, prepared-data checks, offline-safe downloads, whole splits, random access
image_folder.py  a directory of class subdirectories of JPEG/PNG files (optional JSON class map)
transforms.py    centre crop to a square and resize (area-averaged down, bicubic up)
"""
