"""dlib's face alignment and Pillow's resampling ported to torch (with Triton kernels on CUDA), equal to the
originals: the FFHQ alignment on a device. Knows nothing of E2Style, Ray, storage or pipeline/.

One module per part, as dlib keeps them (each reads top-down: torch reference, Triton kernels, launchers, the
public function or class):

- formats.py: dlib's portable serialization (reader, writer) and the frontal detector's file.
- svd.py: dlib's SVD, step for step.
- pyramid.py: pyramid_down<6> sizes, levels, rectangle maps, window boxes; dlib's bilinear RGB resize.
- fhog.py: fHOG features. filters.py: the separable filter bank and window scores.
- suppression.py: libstdc++'s std::sort order and dlib's non-maximum suppression.
- detector.py: FrontalFaceDetector (and ``python -m models.alignment.detector``, its device check).
- landmarks_model.py: the shape predictor's file; landmarks.py: the 68-point ShapePredictor.
- resample.py: Pillow's bilinear QUAD/AFFINE sampling and 8-bit Lanczos resize.
- ffhq_geometry.py: the FFHQ quad and crop geometry (numpy, shared with pipeline/crop.py); ffhq_crop.py: the
  batched crop and the upright re-prediction of rolled faces.
- device.py: uploads and photo staging. Kernels are trusted through models/kernel_check.py, the one way every
  Triton kernel of models/ is checked.
"""
