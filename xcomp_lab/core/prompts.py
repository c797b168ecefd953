"""The course's caption query, the same for the replica and the original's own code, without importing either.

`xcomp_lab.model.tokenizer` (whose vocabulary holds its words) re-exports it; the captioning helpers of
`xcomp_lab.run` read it from here, so that they import under the original's transformers 4.33.2 too.
"""

CAPTION_QUERY = "Describe the image in one sentence."
