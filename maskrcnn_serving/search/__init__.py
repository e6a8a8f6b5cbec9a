"""Instance search: the embeddings of detected objects in a real vector database (Milvus Lite by default, a Milvus
server or cluster by URL). :mod:`.database` connects, :mod:`.index` stores and searches."""
