"""Moving a model's slices and activations between the nodes of a cluster (ZeroMQ).

``protocol`` defines the messages, ``links`` makes sockets (liveness and security settings in
one place), ``mesh`` is the data plane's all-gather, ``wire`` encodes activations on it, ``sync``
holds the forward's sync points (``model.sync``'s protocols: the root's ``RootSync``, a forward's
``ForwardSync``), ``root`` and ``worker`` are the two ends of the control plane, ``slice_cache``
keeps a worker's slices on disk. Nothing here knows the model's math or imports the model: the
forward calls these sync objects between blocks.
"""
