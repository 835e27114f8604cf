"""Networks over volumes (N, C, D, H, W): CosmoFlow and a small 3-D test
network.  Both regress K float targets with the mean-squared-error loss."""
from __future__ import annotations

from hpcnn.graph import Graph

#: TensorFlow's padding='same' for a kernel of 2: nothing before, one after
SAME_K2 = ((0, 1), (0, 1), (0, 1))


def cosmoflow(batch, in_channels, volume_size, num_outputs, name="cosmoflow", base_filters=32,
              dropout=0.5) -> Graph:
    """CosmoFlow as in the MLPerf HPC reference (mlcommons/hpc, cosmoflow:
    conv_size 32, kernel 2, 5 conv layers, fc 128 and 64, dropout 0.5):
    five stages of conv3d (base_filters * 2**i filters, kernel 2, 'same'
    padding) + leaky ReLU (slope 0.3, Keras' default) + 2x2x2 max pooling;
    flatten; fc 128 + leaky ReLU + dropout; fc 64 + leaky ReLU + dropout;
    fc to the outputs, 1.2 * tanh; mean-squared-error loss.  The input is
    4 x 128^3 in the reference (four redshifts of a dark-matter density)."""
    g = Graph(name)
    x = g.input((batch, in_channels) + tuple(volume_size))
    for i in range(5):
        x = g.conv3d(x, base_filters * 2 ** i, 2, padding=SAME_K2, name=f"conv{i + 1}")
        x = g.leaky_relu(x, 0.3, name=f"act{i + 1}")
        x = g.maxpool3d(x, 2, name=f"pool{i + 1}")
    x = g.flatten(x, name="flatten")
    for j, width in enumerate((128, 64)):
        x = g.linear(x, width, name=f"fc{j + 1}")
        x = g.leaky_relu(x, 0.3, name=f"fc{j + 1}_act")
        if dropout:
            x = g.dropout(x, dropout, name=f"fc{j + 1}_drop")
    x = g.linear(x, num_outputs, name="fc3")
    x = g.tanh(x, 1.2, name="output")
    g.mse_loss(x)
    return g


def volume_small(batch, in_channels, volume_size, num_outputs, name="volume_small") -> Graph:
    """A small 3-D network with every volume op (tests): conv3d 4@3^3 (pad
    1, no bias) + batch norm + leaky ReLU; 2^3 max pool; conv3d 6@2^3 ('same') +
    leaky ReLU; 3^3 average pool (stride 2, pad 1); conv3d 8@3^3 with
    dilation 2 (pad 2) + leaky ReLU; global average pool; fc; tanh; MSE."""
    g = Graph(name)
    x = g.input((batch, in_channels) + tuple(volume_size))
    x = g.conv3d(x, 4, 3, padding=1, bias=False, name="conv1")   # batch norm follows
    x = g.bn(x, name="bn1")
    x = g.leaky_relu(x, 0.1, name="act1")
    x = g.maxpool3d(x, 2, name="pool1")
    x = g.conv3d(x, 6, 2, padding=SAME_K2, name="conv2")
    x = g.leaky_relu(x, 0.1, name="act2")
    x = g.avgpool3d(x, 3, stride=2, padding=1, name="pool2")
    x = g.conv3d(x, 8, 3, padding=2, dilation=2, name="conv3")
    x = g.leaky_relu(x, 0.1, name="act3")
    x = g.global_avgpool(x, name="avgpool")
    x = g.linear(x, num_outputs, name="fc")
    x = g.tanh(x, name="output")
    g.mse_loss(x)
    return g
