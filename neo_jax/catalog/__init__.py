"""From a catalog to semantic IDs: item embeddings, quantisation, collisions and the SID trie."""
