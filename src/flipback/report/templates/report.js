/* flipback report: gallery with filters, sorting, paging and a detail view.
 * Data comes from the JSON block #flipback-data. Every string from the data is put into
 * the page with textContent or as an attribute set through the DOM, never as HTML. */
(function () {
  'use strict';
  // What a region method's change did inside the regions (the record's "change").
  var CHANGES = {remove: 'removed: moved toward a local blur of the image',
                 free: 'changed freely within the regions (within +-eps)'};
  var T0 = performance.now();
  var timings = { parseMs: 0, firstRenderMs: 0, lastRenderMs: 0, renders: 0 };
  window.flipbackTimings = timings;

  var dataEl = document.getElementById('flipback-data');
  if (!dataEl) { return; }
  var D = JSON.parse(dataEl.textContent);
  timings.parseMs = performance.now() - T0;
  var classes = D.classes || [];
  var recs = D.records || [];
  var byIdx = new Map();
  recs.forEach(function (r) { byIdx.set(r.i, r); });

  function $(id) { return document.getElementById(id); }
  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) { e.className = cls; }
    if (text !== undefined && text !== null) { e.textContent = String(text); }
    return e;
  }
  function cname(c) { return (typeof c === 'number' && c >= 0 && c < classes.length) ? classes[c] : '?'; }
  function num(v, digits) {
    if (v === null || v === undefined || !isFinite(v)) { return '–'; }
    return Number(v).toPrecision(digits || 4).replace(/(\.\d*?)0+$/, '$1').replace(/\.$/, '');
  }
  function fixed(v, d) { return (v === null || v === undefined || !isFinite(v)) ? '–' : Number(v).toFixed(d); }
  function levels(v) { return (v === null || v === undefined || !isFinite(v)) ? '–' : (Math.round(v * 2550) / 10) + '/255'; }
  function score(v) {
    if (v === null || v === undefined || !isFinite(v)) { return '–'; }
    if (v === 0 || v >= 0.001) { return Number(v).toFixed(3); }
    return Number(v).toExponential(1);
  }
  function pct(v, d) { return (v === null || v === undefined || !isFinite(v)) ? '–' : (v * 100).toFixed(d === undefined ? 1 : d) + '%'; }

  var grid = $('grid');
  if (!grid) { return; }
  var selTrue = $('f-true'), selPred = $('f-pred'), selOut = $('f-outcome'), selSort = $('f-sort');
  var inName = $('f-name'), selSize = $('f-size'), countEl = $('count');
  var state = { page: 0, size: parseInt(selSize.value, 10) || 60 };
  var view = recs.slice();

  // Class filters: only classes that occur, with their error counts.
  function fillClassSelect(sel, key) {
    var counts = new Map();
    recs.forEach(function (r) { counts.set(r[key], (counts.get(r[key]) || 0) + 1); });
    var keys = Array.from(counts.keys()).sort(function (a, b) { return a - b; });
    keys.forEach(function (c) {
      var o = el('option', null, cname(c) + ' (' + counts.get(c) + ')');
      o.value = String(c);
      sel.appendChild(o);
    });
  }
  fillClassSelect(selTrue, 't');
  fillClassSelect(selPred, 'p');

  function keyOf(r, k) {
    if (k === 'l2') { return r.ok ? r.l2 : null; }
    if (k === 'q') { return r.q; }
    if (k === 'share') { return (r.reg && r.reg.length) ? r.reg[0][0] : null; }
    if (k === 'linf') { return r.ok ? r.li : null; }
    return r.i;
  }
  function comparator(spec) {
    var parts = spec.split(':'), k = parts[0], dir = parts[1] === 'desc' ? -1 : 1;
    return function (a, b) {
      var x = keyOf(a, k), y = keyOf(b, k);
      var xn = x === null || x === undefined, yn = y === null || y === undefined;
      if (xn || yn) { if (xn && yn) { return a.i - b.i; } return xn ? 1 : -1; }
      return (x - y) * dir || a.i - b.i;
    };
  }

  function applyFilters(keepPage) {
    var t0 = performance.now();
    var t = selTrue.value === '' ? null : parseInt(selTrue.value, 10);
    var p = selPred.value === '' ? null : parseInt(selPred.value, 10);
    var out = selOut.value, q = inName.value.trim().toLowerCase();
    view = recs.filter(function (r) {
      if (t !== null && r.t !== t) { return false; }
      if (p !== null && r.p !== p) { return false; }
      if (out === 'ok' && !r.ok) { return false; }
      if (out === 'fail' && r.ok) { return false; }
      if (q && String(r.n).toLowerCase().indexOf(q) < 0) { return false; }
      return true;
    });
    view.sort(comparator(selSort.value));
    if (!keepPage) { state.page = 0; }
    render();
    timings.lastRenderMs = performance.now() - t0;
    timings.renders += 1;
  }

  // A tile strip (original, corrected, change, change over the original) shown `zoom` times
  // its usual size, with the top three regions outlined over the last panel.
  function tile(r, zoom) {
    var g = r.geo || D.geo, s = g.scale * zoom;
    var wrap = el('div', 'tile');
    var img = el('img', 'strip');
    img.src = r.tile;
    img.alt = 'original, corrected, change and regions of image ' + r.i;
    img.width = g.width * s;
    img.height = g.height * s;
    wrap.appendChild(img);
    var x0 = 3 * (g.pw + g.gap), fx = g.pw / g.w, fy = g.ph / g.h;
    (r.reg || []).slice(0, 3).forEach(function (q, k) {
      if (q[2] === null || q[3] === null || q[4] === null || q[5] === null) { return; }
      var b = el('div', 'box r' + (k + 1));
      b.style.left = ((x0 + q[3] * fx) / g.width * 100) + '%';
      b.style.top = (q[2] * fy / g.height * 100) + '%';
      b.style.width = (Math.max(1, q[5] - q[3]) * fx / g.width * 100) + '%';
      b.style.height = (Math.max(1, q[4] - q[2]) * fy / g.height * 100) + '%';
      wrap.appendChild(b);
    });
    return wrap;
  }

  function card(r) {
    var c = el('article', 'card');
    c.tabIndex = 0;
    c.dataset.idx = String(r.i);
    if (r.tile && (r.geo || D.geo)) {
      c.appendChild(tile(r, 1));
    } else if (r.fig) {
      var f = el('img', 'strip');
      f.src = r.fig;
      f.alt = 'figure of image ' + r.i;
      c.appendChild(f);
    } else {
      c.appendChild(el('div', 'noimg', 'no image stored'));
    }
    var l1 = el('div', 'l1');
    l1.appendChild(el('span', 'badge ' + (r.ok ? 'ok' : 'fail'), r.ok ? 'corrected' : 'not corrected'));
    l1.appendChild(el('span', 'idx', '#' + r.i));
    var nm = el('span', 'nm', r.n);
    nm.title = String(r.n);
    l1.appendChild(nm);
    c.appendChild(l1);
    var l2 = el('div', 'l2');
    l2.appendChild(document.createTextNode('true '));
    l2.appendChild(el('span', 'cls', cname(r.t)));
    l2.appendChild(document.createTextNode(' · predicted '));
    l2.appendChild(el('span', 'cls', cname(r.p)));
    if (!r.ok && r.a !== r.p && r.a >= 0) {
      l2.appendChild(document.createTextNode(' → '));
      l2.appendChild(el('span', 'cls', cname(r.a)));
    }
    c.appendChild(l2);
    var bits = [];
    bits.push('L2 ' + num(r.l2, 3));
    bits.push('Linf ' + levels(r.li));
    bits.push((r.q === null ? '–' : r.q) + (r.q === 1 ? ' query' : ' queries'));
    if (r.reg && r.reg.length) { bits.push('top region ' + pct(r.reg[0][0], 0)); }
    c.appendChild(el('div', 'l3', bits.join(' · ')));
    if (r.err) { c.appendChild(el('div', 'err', r.err)); }
    return c;
  }

  function render() {
    var n = view.length, pages = Math.max(1, Math.ceil(n / state.size));
    if (state.page >= pages) { state.page = pages - 1; }
    var start = state.page * state.size, end = Math.min(n, start + state.size);
    var frag = document.createDocumentFragment();
    for (var k = start; k < end; k++) { frag.appendChild(card(view[k])); }
    if (!n) { frag.appendChild(el('div', 'empty', recs.length ? 'No image matches these filters.' : 'No misclassified images.')); }
    grid.replaceChildren(frag);
    countEl.textContent = n === recs.length ? (n + ' errors') : (n + ' of ' + recs.length + ' errors');
    grid.dataset.count = String(n);
    ['', '-b'].forEach(function (suf) {
      var info = $('page-info' + suf);
      if (!info) { return; }
      info.textContent = n ? ('showing ' + (start + 1) + '–' + end + ' of ' + n + ' · page ' + (state.page + 1) + ' of ' + pages) : '';
      $('prev' + suf).disabled = state.page === 0;
      $('next' + suf).disabled = state.page >= pages - 1;
    });
  }

  function go(delta, scroll) {
    state.page += delta;
    render();
    if (scroll) { $('gallery').scrollIntoView(); }
  }
  $('prev').addEventListener('click', function () { go(-1); });
  $('next').addEventListener('click', function () { go(1); });
  $('prev-b').addEventListener('click', function () { go(-1, true); });
  $('next-b').addEventListener('click', function () { go(1, true); });
  [selTrue, selPred, selOut, selSort].forEach(function (s) { s.addEventListener('change', function () { applyFilters(); }); });
  var nameTimer = null;
  inName.addEventListener('input', function () { clearTimeout(nameTimer); nameTimer = setTimeout(function () { applyFilters(); }, 120); });
  selSize.addEventListener('change', function () { state.size = parseInt(selSize.value, 10) || 60; applyFilters(); });
  $('f-clear').addEventListener('click', function () {
    selTrue.value = ''; selPred.value = ''; selOut.value = 'all'; inName.value = ''; selSort.value = 'index:asc';
    applyFilters();
  });

  function setPair(t, p) {
    selTrue.value = String(t); selPred.value = String(p);
    if (selTrue.value !== String(t) || selPred.value !== String(p)) { selTrue.value = ''; selPred.value = ''; }
    applyFilters();
    $('gallery').scrollIntoView();
  }
  document.querySelectorAll('[data-pair]').forEach(function (node) {
    function pick() {
      var tp = node.dataset.pair.split(',');
      setPair(parseInt(tp[0], 10), parseInt(tp[1], 10));
    }
    node.addEventListener('click', pick);
    node.addEventListener('keydown', function (e) { if (e.key === 'Enter') { pick(); } });
  });

  grid.addEventListener('click', function (e) {
    var c = e.target.closest('.card');
    if (c) { openDetail(parseInt(c.dataset.idx, 10), true); }
  });
  grid.addEventListener('keydown', function (e) {
    var c = e.target.closest('.card');
    if (c && (e.key === 'Enter' || e.key === ' ')) { e.preventDefault(); openDetail(parseInt(c.dataset.idx, 10), true); }
  });

  // ---- detail view ----
  var dlg = $('detail'), dTitle = $('d-title'), dBody = $('d-body'), current = null;
  function row(tbody, k, v, cls) {
    var tr = el('tr');
    tr.appendChild(el('td', 'k', k));
    var td = el('td', 'v' + (cls ? ' ' + cls : ''));
    if (v instanceof Node) { td.appendChild(v); } else { td.textContent = v; }
    tr.appendChild(td);
    tbody.appendChild(tr);
  }
  function bar(frac, cls) {
    var b = el('div', 'bar' + (cls ? ' ' + cls : ''));
    b.style.width = Math.max(0, Math.min(1, frac || 0)) * 100 + '%';
    return b;
  }
  function link(href, text) {
    var a = el('a', null, text);
    a.href = href;
    a.target = '_blank';
    a.rel = 'noopener noreferrer';
    return a;
  }
  function fillDetail(r) {
    dTitle.textContent = '#' + r.i + ' · ' + r.n;
    var frag = document.createDocumentFragment();

    var imgs = el('div', 'full');
    if (r.tile && (r.geo || D.geo)) {
      var g = r.geo || D.geo, big = tile(r, 2);
      big.classList.add('big');
      imgs.appendChild(big);
      var caps = el('div', 'caps');
      caps.style.width = (g.width * g.scale * 2) + 'px';
      ['original', 'corrected', 'change, amplified', 'where it changed'].forEach(function (t) { caps.appendChild(el('span', null, t)); });
      imgs.appendChild(caps);
    }
    frag.appendChild(imgs);

    var facts = el('div');
    facts.appendChild(el('h4', null, 'Result'));
    var ft = el('table'), fb = el('tbody');
    row(fb, 'image', r.n);
    row(fb, 'true class', cname(r.t), 'cls');
    row(fb, 'predicted before', cname(r.p));
    row(fb, 'predicted after', r.a >= 0 ? cname(r.a) : '–');
    row(fb, 'outcome', r.ok ? 'corrected: the model now answers the true class' : 'not corrected', r.ok ? 'better' : 'worse');
    row(fb, 'queries', r.q === null ? '–' : String(r.q));
    row(fb, 'L2 of the change', num(r.l2, 4));
    row(fb, 'Linf of the change', r.li === null ? '–' : fixed(r.li, 4) + ' (' + levels(r.li) + ')');
    row(fb, 'values changed (L0)', r.l0 === null ? '–' : String(r.l0));
    row(fb, 'pixels changed by > 1/255', pct(r.fc, 1));
    if (r.ch) { row(fb, 'change in the regions', CHANGES[r.ch] || r.ch); }
    if (r.err) { row(fb, 'error', r.err, 'err'); }
    ft.appendChild(fb);
    facts.appendChild(ft);
    frag.appendChild(facts);

    var sc = el('div');
    sc.appendChild(el('h4', null, 'Class scores before → after'));
    if (r.sc && r.sc.length) {
      var st = el('table'), sh = el('thead'), shr = el('tr');
      ['class', 'before', '', 'after', ''].forEach(function (h, k) { shr.appendChild(el('th', k === 1 || k === 3 ? 'num' : null, h)); });
      sh.appendChild(shr); st.appendChild(sh);
      var sb = el('tbody');
      r.sc.forEach(function (s) {
        var tr = el('tr', s[0] === r.t ? 'true' : null);
        tr.appendChild(el('td', null, cname(s[0]) + (s[0] === r.t ? ' (true)' : '')));
        tr.appendChild(el('td', 'num', score(s[1])));
        var b1 = el('td', 'barcell'); b1.appendChild(bar(s[1])); tr.appendChild(b1);
        tr.appendChild(el('td', 'num', score(s[2])));
        var b2 = el('td', 'barcell'); b2.appendChild(bar(s[2], 'after')); tr.appendChild(b2);
        sb.appendChild(tr);
      });
      st.appendChild(sb);
      sc.appendChild(st);
    } else {
      sc.appendChild(el('p', 'empty', 'No scores stored.'));
    }
    frag.appendChild(sc);

    var rg = el('div', 'full');
    rg.appendChild(el('h4', null, 'Regions of the change, ranked by their share of it'));
    if (r.reg && r.reg.length) {
      var rt = el('table'), rh = el('thead'), rhr = el('tr');
      ['rank', 'share of the change', '', 'area (px)', 'box (y0, x0, y1, x1)', 'centre (y, x)'].forEach(function (h) { rhr.appendChild(el('th', null, h)); });
      rh.appendChild(rhr); rt.appendChild(rh);
      var rb = el('tbody');
      r.reg.forEach(function (g, k) {
        var tr = el('tr');
        var rank = el('td');
        if (k < 3) { rank.appendChild(el('span', 'sw r' + (k + 1))); }
        rank.appendChild(document.createTextNode(String(k + 1)));
        tr.appendChild(rank);
        tr.appendChild(el('td', 'num', pct(g[0], 1)));
        var bc = el('td', 'barcell'); bc.appendChild(bar(g[0], 'share')); tr.appendChild(bc);
        tr.appendChild(el('td', 'num', String(g[1])));
        tr.appendChild(el('td', null, g.slice(2, 6).join(', ')));
        tr.appendChild(el('td', null, fixed(g[6], 1) + ', ' + fixed(g[7], 1)));
        rb.appendChild(tr);
      });
      rt.appendChild(rb);
      rg.appendChild(rt);
    } else {
      rg.appendChild(el('p', 'empty', 'No regions: the image did not change.'));
    }
    frag.appendChild(rg);

    if (r.fig) {
      var fg = el('div', 'full');
      fg.appendChild(el('h4', null, 'Figure'));
      var fimg = el('img', 'fig');
      fimg.src = r.fig;
      fimg.alt = 'figure of image ' + r.i;
      fimg.loading = 'lazy';
      fg.appendChild(fimg);
      frag.appendChild(fg);
    }

    var links = el('div', 'full links');
    links.appendChild(el('h4', null, 'Files'));
    if (r.fig) { links.appendChild(link(r.fig, 'figure (PNG)')); }
    if (r.img) { links.appendChild(link(r.img, 'corrected image (PNG, as verified)')); }
    if (r.tile) { links.appendChild(link(r.tile, 'tiles')); }
    if (!r.fig && !r.img && !r.tile) { links.appendChild(el('span', 'empty', 'no files stored for this image')); }
    frag.appendChild(links);

    dBody.replaceChildren(frag);
    var pos = view.indexOf(r);
    $('d-prev').disabled = pos <= 0;
    $('d-next').disabled = pos < 0 || pos >= view.length - 1;
  }
  function openDetail(idx, setHash) {
    var r = byIdx.get(idx);
    if (!r) { return; }
    current = r;
    fillDetail(r);
    if (!dlg.open) { dlg.showModal(); }
    if (setHash && location.hash !== '#img-' + idx) {
      try { history.replaceState(null, '', '#img-' + idx); } catch (e) { location.hash = 'img-' + idx; }
    }
  }
  function step(d) {
    if (!current) { return; }
    var pos = view.indexOf(current);
    if (pos < 0 || pos + d < 0 || pos + d >= view.length) { return; }
    openDetail(view[pos + d].i, true);
  }
  $('d-prev').addEventListener('click', function () { step(-1); });
  $('d-next').addEventListener('click', function () { step(1); });
  $('d-close').addEventListener('click', function () { dlg.close(); });
  dlg.addEventListener('click', function (e) { if (e.target === dlg) { dlg.close(); } });
  dlg.addEventListener('keydown', function (e) {
    if (e.key === 'ArrowLeft') { step(-1); } else if (e.key === 'ArrowRight') { step(1); }
  });
  dlg.addEventListener('close', function () {
    // The close event comes a task later: by then a link followed meanwhile may have opened
    // another image, or be about to (its hash set), so only the closed image's hash is reset.
    if (dlg.open) { return; }
    var shown = current;
    current = null;
    if (shown && location.hash === '#img-' + shown.i) {
      try { history.replaceState(null, '', '#gallery'); } catch (e) { /* keep the hash */ }
    }
  });
  function fromHash() {
    var m = /^#img-(\d+)$/.exec(location.hash);
    if (m) { openDetail(parseInt(m[1], 10), false); } else if (dlg.open) { dlg.close(); }
  }
  window.addEventListener('hashchange', fromHash);

  applyFilters();
  timings.firstRenderMs = performance.now() - T0;
  document.body.dataset.ready = '1';
  fromHash();
})();
