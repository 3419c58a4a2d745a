"""The locator: a small dense model on a frozen feature map that says, per feature cell, "an
object of class c is centred here, this big" (CenterNet, "Objects as Points"), trained from the
user's own boxes beside the head and shipped in the head's bundle as `locator.onnx`.

    frame = FeatureFrame.for_image(w, h, input_size, resize, rows, cols)   # where cells sit
    t = targets.build(boxes, class_ids, frame, n_classes)                   # training targets
    net = train.fit(maps, targets, ...)                                     # torch, CPU
    ref = refiner.fit(maps, frames, boxes)                                  # linear, seconds
    onnx_bytes = export.to_onnx(net, ref)                                   # node by node
    loc = Locator(onnx_bytes, meta)                                         # onnxruntime only
    d = loc.detect(fmap, frame, floor=0.05)         # LocatorDetections: XYXY image pixels, refined

Modules: frame (geometry), targets (heatmaps from boxes), train (the torch net and its fit),
refiner (boxes moved and scored from the map pooled about them), export (ONNX graph +
parity), decode (peaks -> boxes, numpy), model (the runtime Locator).
"""
