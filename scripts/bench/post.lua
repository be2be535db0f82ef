-- wrk script for scripts/bench.sh's http-post-rps figure: every request is a
-- POST of the same 228-byte JSON body, an OpenAI-style chat request as an
-- inference client sends it (what the L7 mode's users send, where http-rps
-- sends a GET). wrk formats the request once and writes head and body in one
-- write, as Python's http.client does for a bytes body.
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"model": "llama", "messages": [{"role": "user", "content": "hello there, how are you today? hello there, how are you today? hello there, how are you today? hello there, how are you today? "}], "stream": false, "max_tokens": 64}'
