"""Frequency ablations of FcaNet (paper Sec. 4.2, appendix 6.1): Fig. 4 and Tables 1, 5, 6.

``python -m ablation plan|run|collect --study single_freq|topk|lowk|botk --preset mini|imagenet``.
"""
