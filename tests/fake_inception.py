"""A stand-in for the 2015-12-05 Inception graph: same tensor names and structure, tiny weights (tests only)."""

import tarfile

import numpy as np

from cm_jax.evaluation import inception

SIZE, DIM, CLASSES = 8, 6, 5  # Resize target, pool_3 width, classes of the fake graph.


def fake_weights():
  rng = np.random.default_rng(12)
  return {'conv_w': rng.normal(size=(3, DIM)), 'conv_b': rng.normal(size=DIM),
          'w': rng.normal(size=(DIM, CLASSES)), 'b': 5.0 * rng.normal(size=CLASSES)}


def fake_graph_def(weights):
  """ExpandDims -> ResizeBilinear (to 8x8) -> (x - 128) / 128 -> 1x1 conv + ReLU -> pool_3 -> softmax, as the real
  graph, whose own softmax branch also reshapes to batch 1."""
  tf = inception._tf()  # pylint: disable=protected-access
  graph = tf.Graph()
  with graph.as_default():
    const = lambda a, **kw: tf.constant(np.asarray(a, np.float32), **kw)
    decoded = tf.compat.v1.placeholder(tf.float32, [None, None, 3], name='Cast')
    x = tf.expand_dims(decoded, 0, name='ExpandDims')
    x = tf.raw_ops.ResizeBilinear(images=x, size=tf.constant([SIZE, SIZE]), align_corners=False,
                                  half_pixel_centers=False, name='ResizeBilinear')
    x = tf.multiply(tf.subtract(x, 128.0, name='Sub'), 1.0 / 128.0, name='Mul')
    x = tf.nn.relu(tf.nn.conv2d(x, const(weights['conv_w'][None, None]), 1, 'VALID') + const(weights['conv_b']))
    pool = tf.nn.avg_pool2d(x, SIZE, 1, 'VALID', name='pool_3')
    flat = tf.reshape(pool, [1, DIM], name='pool_3/_reshape')
    logits = tf.matmul(flat, const(weights['w'], name='softmax/weights'), name='softmax/logits/MatMul')
    tf.nn.softmax(tf.nn.bias_add(logits, const(weights['b']), name='softmax/logits'), name='softmax')
  return graph.as_graph_def()


def legacy_resize(x_NHWC, size):
  """TF1 ResizeBilinear (no align_corners, no half-pixel centres) in numpy: source = dest * in / out."""
  for axis in (1, 2):
    n_in = x_NHWC.shape[axis]
    src = np.arange(size) * (n_in / size)
    lo = np.floor(src).astype(int)
    hi, frac = np.minimum(lo + 1, n_in - 1), src - lo
    frac = frac.reshape([size if a == axis else 1 for a in range(4)])
    x_NHWC = np.take(x_NHWC, lo, axis) * (1 - frac) + np.take(x_NHWC, hi, axis) * frac
  return x_NHWC


def expected_outputs(images_NHWC, weights):
  x = images_NHWC.astype(np.float64)
  x = np.repeat(x, 3, axis=-1) if x.shape[-1] == 1 else x
  x = (legacy_resize(x, SIZE) - 128.0) / 128.0
  features = np.maximum(x @ weights['conv_w'] + weights['conv_b'], 0.0).mean(axis=(1, 2))
  logits = features @ weights['w']  # No bias: as TTUR and the ADM evaluator.
  probs = np.exp(logits - logits.max(1, keepdims=True))
  return features, probs / probs.sum(1, keepdims=True)


def write(folder):
  """(weights, path of the .pb, path of a .tgz packing it as classify_image_graph_def.pb with a label file)."""
  weights = fake_weights()
  pb = folder / inception.GRAPH_FILE
  pb.write_bytes(fake_graph_def(weights).SerializeToString())
  labels = folder / 'imagenet_synset_to_human_label_map.txt'
  labels.write_text('n00000000\tnothing\n')
  tgz = folder / 'inception-2015-12-05.tgz'
  with tarfile.open(tgz, 'w:gz') as archive:
    archive.add(labels, arcname=labels.name)
    archive.add(pb, arcname=inception.GRAPH_FILE)
  return weights, str(pb), str(tgz)
