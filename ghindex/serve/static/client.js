// What both pages of `ghindex serve` need to talk to it: the HTTP API with the tab's token, and database
// images by id (a plain URL, or fetched with the token and shown from a blob). Plain JavaScript.
window.ghindexClient = (() => {
  "use strict";

  class AuthError extends Error {}

  // state.token: the tab's token ("" for none); onAuth(): the server asked for a token (show the form);
  // onBlobUrl(url): an object URL made for an image, for the page to release when it is done with it.
  function connect(state, onAuth, onBlobUrl = () => {}) {
    async function api(path, options = {}) {
      const headers = new Headers(options.headers || {});
      if (state.token) headers.set("Authorization", "Bearer " + state.token);
      const res = await fetch(path, { ...options, headers });
      if (res.status === 401) {
        onAuth();
        throw new AuthError("This server needs a token.");
      }
      if (!res.ok) {
        let message = res.status + " " + res.statusText;
        try {
          const body = await res.json();
          if (body && body.error) message = body.error;
        } catch (_) { /* not JSON */ }
        throw new Error(message);
      }
      return res;
    }

    function setImage(img, id) {
      const url = "/api/items/" + encodeURIComponent(id) + "/image";
      if (!state.token) {
        img.src = url;
        return;
      }
      api(url).then((res) => res.blob()).then((blob) => {
        const objectUrl = URL.createObjectURL(blob);
        onBlobUrl(objectUrl);
        img.src = objectUrl;
      }).catch(() => img.dispatchEvent(new Event("error")));
    }

    return { api, setImage };
  }

  return { AuthError, connect };
})();
